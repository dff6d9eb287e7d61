"""The department status board: the pages (a static shell: no data without a token), the day's figures,
the delay flags (``/api/board/alerts``), the readable timeline, the wall view's data (``wall`` role) and
the live streams of changes (SSE).

Every time the board shows is in the board's zone (setting ``timezone``): "today" is computed here,
times are sent as ISO with their offset and the zone's name, and the page renders them in that zone.
The rules and figures are :mod:`broker.board`'s; this module only reads, shapes and serves them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, Field

from broker import metrics
from broker.board import figures, rules
from broker.board.day import DayProcedure, read_day, read_timeline
from broker.board.privacy import wall_patient
from broker.board.zone import board_zone, today
from broker.config import Settings
from broker.web.access_audit import note_patients, patient_ref
from broker.web.auth import Caller, ReadAccess, WallAccess, stream_reader, wall_stream_reader
from broker.web.live import LiveFeed

STATIC = Path(__file__).parent / "static"
KEEPALIVE_SECONDS = 15
RECHECK_SECONDS = 1.0
"""after changes, the next flag's moment is read again this long after the first of them"""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Register the delay gauges of this app's database with ``/metrics`` while the app runs."""
    remove = metrics.add_scrape_source(app.state.engine, lambda: delay_gauges(app.state.engine, app.state.settings))
    try:
        yield
    finally:
        remove()


router = APIRouter(tags=["board"], lifespan=_lifespan)


@dataclass(frozen=True)
class BoardConfig:
    """The board's settings in the shapes the rules and views use."""

    zone: ZoneInfo
    rules: rules.Rules
    wall_patient: Literal["initials", "full", "none"]
    wall_id_digits: int

    @classmethod
    def of(cls, settings: Settings) -> BoardConfig:
        return cls(board_zone(settings.timezone),
                   rules.Rules.from_minutes(settings.board_start_late_minutes, settings.expected_minutes,
                                            settings.board_images_minutes),
                   settings.board_wall_patient, settings.board_wall_id_digits)


def _config(request: Request) -> BoardConfig:
    return BoardConfig.of(request.app.state.settings)


class Turnaround(BaseModel):
    count: int = Field(description="procedures of the day that went through both points")
    median_seconds: float | None
    mean_seconds: float | None


class HourCount(BaseModel):
    hour: int = Field(description="hour of the first step's scheduled start (board's zone), 0-23")
    total: int
    done: int = Field(description="of which completed or further (images available, archived, ...)")


class ModalityFigures(BaseModel):
    done: int = Field(description="completed or further")
    to_do: int = Field(description="not yet completed (neither discontinued nor canceled)")
    closed: int = Field(description="discontinued or canceled")
    waiting: Turnaround = Field(description="from the appointment (or the order, if later) to the start")
    order_to_start: Turnaround
    start_to_complete: Turnaround
    complete_to_images: Turnaround


class DaySummary(BaseModel):
    date: str = Field(description="the day, YYYY-MM-DD; default today in the board's zone")
    zone: str = Field(description="the board's time zone (IANA name)")
    now: str = Field(description="the broker's clock, ISO with offset")
    total: int
    by_state: dict[str, int]
    by_hour: list[HourCount]
    turnaround: dict[str, Turnaround] = Field(description="order_to_start, start_to_complete, complete_to_images")
    by_modality: dict[str, ModalityFigures]
    alerts: dict[str, int] = Field(description="delay flags now, per rule (not_started, overrunning, "
                                               "images_missing)")


class Alert(BaseModel):
    procedure_id: int
    accession_number: str
    patient_id: str
    patient_name: str = Field(description="DICOM PN")
    modality: str
    room: str
    state: str
    rule: str = Field(description="not_started, overrunning or images_missing")
    label: str = Field(description="what the board shows, e.g. 'Late: not started, due 09:30 (+23 min)'")
    since: str = Field(description="when the rule started to hold, ISO with offset")
    overdue_minutes: int


class AlertList(BaseModel):
    date: str
    zone: str
    now: str
    counts: dict[str, int]
    alerts: list[Alert] = Field(description="longest overdue first")


class TimelineLine(BaseModel):
    at: str | None = Field(description="ISO with offset, the board's zone")
    from_: str = Field(alias="from")
    to: str
    text: str = Field(description="the cause as people read it, e.g. 'MPPS from CT01: in progress'")
    cause: str = Field(description="the stored cause, with its UID")
    kind: str = Field(description="hl7, mpps, ups, ian, stgcmt, ... (empty for the order's arrival)")
    ref: str = Field(description="the event's UID or HL7 control ID")


class Timeline(BaseModel):
    zone: str
    entries: list[TimelineLine]


class WallFlag(BaseModel):
    rule: str
    label: str


class WallItem(BaseModel):
    id: int
    time: str = Field(description="the scheduled start, HH:MM in the board's zone ('' when none)")
    start: str | None = Field(description="the scheduled start, ISO with offset")
    state: str
    patient: str = Field(description="as the board_wall_patient setting allows: initials and the last "
                                     "digits of the Patient ID by default")
    description: str
    modality: str
    room: str
    flag: WallFlag | None


class WallColumn(BaseModel):
    key: str = Field(description="the modality or room")
    done: int
    to_do: int
    flagged: int
    items: list[WallItem]


class WallView(BaseModel):
    date: str
    zone: str
    now: str
    group: str
    privacy: str = Field(description="initials, full or none")
    alerts: dict[str, int]
    columns: list[WallColumn]


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/board")


@router.get("/board", include_in_schema=False)
def page(wall: str = "") -> FileResponse:
    """The desk page, or with ``?wall=1`` the wall page (full screen, no controls)."""
    name = "wall.html" if wall not in ("", "0", "false") else "index.html"
    return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})


DayQuery = Annotated[date | None, Query(alias="date", description="YYYY-MM-DD; default today in the board's zone")]


@router.get("/api/board/summary", response_model=DaySummary,
            summary="A day's counts by state, hour and modality, turnaround times and delay counts")
async def day_summary(request: Request, _: ReadAccess, day: DayQuery = None) -> dict[str, Any]:
    config = _config(request)
    now = datetime.now(config.zone)
    wanted = day or today(config.zone, now)
    procedures = await asyncio.to_thread(read_day, request.app.state.engine, wanted, config.zone)
    return summarize(procedures, wanted, now, config)


def summarize(procedures: list[DayProcedure], day: date, now: datetime, config: BoardConfig) -> dict[str, Any]:
    """The day's figures (see :class:`DaySummary`)."""
    facts = [p.facts for p in procedures]
    by_state: dict[str, int] = {}
    hours = {h: [0, 0] for h in range(24)}
    for p in procedures:
        by_state[p.facts.state] = by_state.get(p.facts.state, 0) + 1
        if p.first_start is not None:
            hours[p.first_start.hour][0] += 1
            hours[p.first_start.hour][1] += p.facts.state in figures.DONE
    per_modality = figures.modality_figures(facts)
    overall = figures.modality_figures([replace(f, modality="") for f in facts])  # one group: the whole day
    turnaround = {name: overall.get("", {}).get(name, {"count": 0, "median_seconds": None, "mean_seconds": None})
                  for name in ("order_to_start", "start_to_complete", "complete_to_images")}
    return {"date": day.isoformat(), "zone": config.zone.key, "now": _iso(now), "total": len(procedures),
            "by_state": by_state, "by_hour": [{"hour": h, "total": t, "done": d} for h, (t, d) in hours.items()],
            "turnaround": turnaround, "by_modality": per_modality,
            "alerts": rules.counts(rules.flags(facts, now, config.rules))}


@router.get("/api/board/alerts", response_model=AlertList, summary="The delay flags of a day, longest overdue first")
async def alerts(request: Request, _: ReadAccess, day: DayQuery = None) -> dict[str, Any]:
    config = _config(request)
    now = datetime.now(config.zone)
    wanted = day or today(config.zone, now)
    procedures = await asyncio.to_thread(read_day, request.app.state.engine, wanted, config.zone)
    by_id = {p.facts.id: p for p in procedures}
    flags = rules.flags([p.facts for p in procedures], now, config.rules)
    listed = []
    for f in flags:
        p = by_id[f.procedure_id]
        listed.append({"procedure_id": f.procedure_id, "accession_number": p.accession_number,
                       "patient_id": p.patient_id, "patient_name": p.patient_name, "modality": f.modality,
                       "room": p.room, "state": p.facts.state, "rule": f.rule, "label": f.label,
                       "since": _iso(f.since), "overdue_minutes": f.overdue_minutes})
    note_patients(request, (patient_ref(by_id[f.procedure_id].patient_id, by_id[f.procedure_id].issuer_of_patient_id)
                            for f in flags))
    return {"date": wanted.isoformat(), "zone": config.zone.key, "now": _iso(now), "counts": rules.counts(flags),
            "alerts": listed}


@router.get("/api/board/timeline/{procedure_id}", response_model=Timeline, response_model_by_alias=True,
            summary="A procedure's history with readable causes", responses={404: {"description": "no such procedure"}})
async def timeline(request: Request, procedure_id: int, _: ReadAccess) -> dict[str, Any]:
    config = _config(request)
    entries = await asyncio.to_thread(read_timeline, request.app.state.engine, procedure_id, config.zone)
    if entries is None:
        raise HTTPException(404, f"no procedure {procedure_id}")
    return {"zone": config.zone.key, "entries": entries}


@router.get("/api/board/wall", response_model=WallView,
            summary="The wall view: a day's procedures per column, patients as the privacy setting allows")
async def wall(request: Request, _: WallAccess, day: DayQuery = None,
               group: Annotated[Literal["modality", "room"], Query(description="one column per modality or room")]
               = "modality") -> dict[str, Any]:
    config = _config(request)
    now = datetime.now(config.zone)
    wanted = day or today(config.zone, now)
    procedures = await asyncio.to_thread(read_day, request.app.state.engine, wanted, config.zone)
    if config.wall_patient != "none":
        note_patients(request, (patient_ref(p.patient_id, p.issuer_of_patient_id) for p in procedures))
    return wall_view(procedures, wanted, now, config, group)


def wall_view(procedures: list[DayProcedure], day: date, now: datetime, config: BoardConfig,
              group: str) -> dict[str, Any]:
    """The wall's columns: only the fields a public screen may show (see :class:`WallItem`)."""
    columns: dict[str, list[dict[str, Any]]] = {}
    all_flags = []
    for p in procedures:
        flag = rules.flag_of(p.facts, now, config.rules)
        if flag is not None:
            all_flags.append(flag)
        key = (p.room if group == "room" else p.facts.modality) or "(unassigned)"
        columns.setdefault(key, []).append({
            "id": p.facts.id, "time": f"{p.first_start:%H:%M}" if p.first_start else "",
            "start": _iso(p.first_start), "state": p.facts.state,
            "patient": wall_patient(p.patient_name, p.patient_id, config.wall_patient, config.wall_id_digits),
            "description": p.description, "modality": p.facts.modality, "room": p.room,
            "flag": {"rule": flag.rule, "label": flag.label} if flag is not None else None})
    shaped = []
    for key in sorted(columns):
        items = columns[key]
        shaped.append({"key": key, "done": sum(i["state"] in figures.DONE for i in items),
                       "to_do": sum(i["state"] not in figures.DONE and i["state"] not in figures.CLOSED for i in items),
                       "flagged": sum(i["flag"] is not None for i in items), "items": items})
    return {"date": day.isoformat(), "zone": config.zone.key, "now": _iso(now), "group": group,
            "privacy": config.wall_patient, "alerts": rules.counts(all_flags), "columns": shaped}


def delay_gauges(engine: Any, settings: Settings) -> Iterator[GaugeMetricFamily]:
    """``broker_board_delays{rule,modality}``: today's delay flags, read at each scrape."""
    config = BoardConfig.of(settings)
    now = datetime.now(config.zone)
    procedures = read_day(engine, today(config.zone, now), config.zone)
    gauge = GaugeMetricFamily("broker_board_delays", "Today's procedures flagged late on the status board, by "
                              "rule (not_started, overrunning, images_missing) and modality",
                              labels=["rule", "modality"])
    counted: dict[tuple[str, str], int] = {}
    for f in rules.flags([p.facts for p in procedures], now, config.rules):
        counted[(f.rule, f.modality)] = counted.get((f.rule, f.modality), 0) + 1
    for rule in rules.RULES:
        if not any(r == rule for r, _ in counted):
            gauge.add_metric([rule, ""], 0)  # every rule present, so an alert on it sees 0, not no data
    for (rule, modality), count in sorted(counted.items()):
        gauge.add_metric([rule, modality], count)
    yield gauge


STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}},
          "description": "events 'procedures' (desk) or 'changed' (wall), 'alerts' when a delay flag rises, "
                         "'ping' every 15 s with the broker's clock"}}


@router.get("/api/stream", summary="Live procedure changes (server-sent events)", response_class=StreamingResponse,
            responses=STREAM_RESPONSES)
async def stream(request: Request, _: Annotated[Caller, Depends(stream_reader)]) -> StreamingResponse:
    """The desk's stream: the summaries of changed procedures (patient names included: read role)."""
    return _event_stream(request, lambda changed: ("procedures", changed))


@router.get("/api/board/wall/stream", summary="Live changes for the wall view (server-sent events)",
            response_class=StreamingResponse, responses=STREAM_RESPONSES)
async def wall_stream(request: Request, _: Annotated[Caller, Depends(wall_stream_reader)]) -> StreamingResponse:
    """The wall's stream: which procedures changed (ids only, no patient data); the wall reads its view
    again."""
    return _event_stream(request, lambda changed: ("changed", [p["id"] for p in changed]))


class NextFlag:
    """When the next delay flag rises, read once for every open stream of the app: each stream asks
    after a change (at most every :data:`RECHECK_SECONDS`) and after a flag rose, and an answer read after
    the moment it needs is shared, so ten walls do not read the day ten times."""

    def __init__(self, engine: Any, config: BoardConfig) -> None:
        self.engine = engine
        self.config = config
        self._read_at = float("-inf")
        self._value: datetime | None = None

    def after(self, moment: float) -> datetime | None:
        """The next flag's moment, read at ``moment`` (``time.monotonic()``) or later."""
        if self._read_at < moment:
            read_at = time.monotonic()
            now = datetime.now(self.config.zone)
            facts = [p.facts for p in read_day(self.engine, today(self.config.zone, now), self.config.zone)]
            self._value, self._read_at = rules.next_flag_at(facts, now, self.config.rules), read_at
        return self._value


def _next_flag(request: Request) -> NextFlag:
    config = _config(request)
    shared: NextFlag | None = getattr(request.app.state, "board_next_flag", None)
    if shared is None or shared.config != config:
        shared = NextFlag(request.app.state.engine, config)
        request.app.state.board_next_flag = shared
    return shared


def _event_stream(request: Request, shape: Any) -> StreamingResponse:
    feed: LiveFeed = request.app.state.feed
    config = _config(request)
    shared = _next_flag(request)

    async def events() -> AsyncIterator[str]:
        queue = await feed.subscribe()
        try:
            yield "retry: 2000\n: connected\n\n"
            yield _event("ping", {"now": _iso(datetime.now(config.zone)), "zone": config.zone.key})
            flag_at = await asyncio.to_thread(shared.after, time.monotonic())
            first_change: float | None = None  # changes since the last reading: the first's and the last's time
            last_change = 0.0
            while True:
                if first_change is not None and time.monotonic() - first_change >= RECHECK_SECONDS:
                    flag_at = await asyncio.to_thread(shared.after, last_change)  # a change may move the deadlines
                    first_change = None
                now = datetime.now(config.zone)
                wait = float(KEEPALIVE_SECONDS)
                if flag_at is not None:
                    wait = min(wait, (flag_at - now).total_seconds() + 0.05)
                if first_change is not None:
                    wait = min(wait, first_change + RECHECK_SECONDS - time.monotonic())
                try:
                    changed = await asyncio.wait_for(queue.get(), max(0.0, wait))
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    now = datetime.now(config.zone)
                    if flag_at is not None and now >= flag_at:
                        yield _event("alerts", {"now": _iso(now)})
                        risen = time.monotonic() - (now - flag_at).total_seconds()
                        flag_at = await asyncio.to_thread(shared.after, risen)  # another stream's reading serves
                    elif first_change is None:
                        yield _event("ping", {"now": _iso(now), "zone": config.zone.key})
                    continue
                if changed is None:
                    return
                name, data = shape(changed)
                yield _event(name, data)
                last_change = time.monotonic()
                first_change = first_change if first_change is not None else last_change
        finally:
            feed.unsubscribe(queue)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment is not None else None
