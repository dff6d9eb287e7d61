"""The department status board: the page (a static shell: no data without a token), the day's
figures (counts by state and by hour, turnaround times) and the live stream of changes (SSE)."""

from __future__ import annotations

import asyncio
import json
import statistics
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from broker.web.auth import Caller, ReadAccess, stream_reader
from broker.web.listing import PROCEDURES, STEPS, day_range
from broker.web.live import TRANSITIONS, LiveFeed

router = APIRouter(tags=["board"])
STATIC = Path(__file__).parent / "static"
KEEPALIVE_SECONDS = 15
# Turnaround figures: (name, from state or "ORDERED", to state).
TURNAROUNDS = (("order_to_start", "ORDERED", "STARTED"), ("start_to_complete", "STARTED", "COMPLETED"),
               ("complete_to_images", "COMPLETED", "IMAGES AVAILABLE"))


class Turnaround(BaseModel):
    count: int = Field(description="procedures of the day that went through both points")
    median_seconds: float | None
    mean_seconds: float | None


class HourCount(BaseModel):
    hour: int = Field(description="hour of the first step's scheduled start, 0-23")
    total: int
    done: int = Field(description="of which completed or further (images available, archived, ...)")


class DaySummary(BaseModel):
    date: str
    total: int
    by_state: dict[str, int]
    by_hour: list[HourCount]
    turnaround: dict[str, Turnaround] = Field(description="order_to_start, start_to_complete, complete_to_images")


DONE_STATES = {"COMPLETED", "IMAGES AVAILABLE", "ARCHIVED", "COMMIT FAILED"}


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/board")


@router.get("/board", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/api/board/summary", response_model=DaySummary, summary="A day's counts by state and hour, "
            "and turnaround times")
async def day_summary(request: Request, _: ReadAccess,
                      day: Annotated[date | None, Query(alias="date", description="YYYY-MM-DD; default today")] = None
                      ) -> dict[str, Any]:
    wanted = day or date.today()
    return await asyncio.to_thread(summarize, request.app.state.engine, wanted)


def summarize(engine: Any, day: date) -> dict[str, Any]:
    """Counts and turnarounds of the procedures with a step scheduled on ``day``."""
    on_day = PROCEDURES.c.id.in_(select(STEPS.c.procedure_fk).where(*day_range(day)))
    start = (select(STEPS.c.scheduled_start).where(STEPS.c.procedure_fk == PROCEDURES.c.id)
             .order_by(STEPS.c.id).limit(1).scalar_subquery())
    with engine.connect() as db:
        procedures = list(db.execute(select(PROCEDURES.c.id, PROCEDURES.c.state, PROCEDURES.c.created_at,
                                            start.label("start")).where(on_day)))
        reached: dict[int, dict[str, datetime]] = {p.id: {"ORDERED": p.created_at} for p in procedures}
        if procedures:
            for t in db.execute(select(TRANSITIONS.c.procedure_fk, TRANSITIONS.c.to_state, TRANSITIONS.c.at)
                                .where(TRANSITIONS.c.procedure_fk.in_(list(reached)))
                                .order_by(TRANSITIONS.c.at, TRANSITIONS.c.id)):
                reached[t.procedure_fk].setdefault(t.to_state, t.at)
    by_state: dict[str, int] = {}
    hours = {h: [0, 0] for h in range(24)}
    for p in procedures:
        by_state[p.state] = by_state.get(p.state, 0) + 1
        if p.start is not None:
            hours[p.start.hour][0] += 1
            hours[p.start.hour][1] += p.state in DONE_STATES
    turnaround = {}
    for name, begin, end in TURNAROUNDS:
        spans = [(r[end] - r[begin]).total_seconds() for r in reached.values() if begin in r and end in r]
        turnaround[name] = {"count": len(spans),
                            "median_seconds": statistics.median(spans) if spans else None,
                            "mean_seconds": statistics.fmean(spans) if spans else None}
    return {"date": day.isoformat(), "total": len(procedures), "by_state": by_state,
            "by_hour": [{"hour": h, "total": t, "done": d} for h, (t, d) in hours.items()],
            "turnaround": turnaround}


@router.get("/api/stream", summary="Live procedure changes (server-sent events)",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "events 'procedures': a JSON array of changed procedure summaries"}})
async def stream(request: Request, _: Annotated[Caller, Depends(stream_reader)]) -> StreamingResponse:
    feed: LiveFeed = request.app.state.feed
    queue = await feed.subscribe()

    async def events() -> Any:
        try:
            yield "retry: 2000\n: connected\n\n"
            while True:
                try:
                    changed = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    yield ": keep-alive\n\n"
                    continue
                if changed is None:
                    return
                yield f"event: procedures\ndata: {json.dumps(changed, separators=(',', ':'))}\n\n"
        finally:
            feed.unsubscribe(queue)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
