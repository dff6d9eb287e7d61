"""The queries that feed the board's rules and views: a day's procedures with the facts the rules need
(read in a handful of statements, whatever the number of procedures), and one procedure's timeline
with readable causes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, select

from broker.board.causes import readable
from broker.board.rules import ProcedureFacts
from broker.board.zone import recorded, scheduled
from broker.store.tables import (
    COMMITMENT_REQUESTS,
    IAN_NOTIFICATIONS,
    MPPS,
    ORDERS,
    PATIENTS,
    PROCEDURE_TRANSITIONS,
    PROCEDURES,
    STEPS,
)

NOT_STARTED_STEPS = frozenset({"SCHEDULED", "ARRIVED", "READY"})
IMAGES_STATES = ("IMAGES AVAILABLE", "ARCHIVED")


@dataclass(frozen=True)
class DayProcedure:
    """A procedure of the day: the rules' facts and what the views show of it."""

    facts: ProcedureFacts
    accession_number: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    description: str
    room: str
    first_start: datetime | None
    """the first step's scheduled start (the time the board lists it at), aware"""


def read_day(engine: Engine, day: date, zone: ZoneInfo) -> list[DayProcedure]:
    """The procedures with a step scheduled on ``day`` (in the board's zone), ordered by first start."""
    begin = datetime.combine(day, time())
    end = begin + timedelta(days=1)
    on_day = PROCEDURES.c.id.in_(select(STEPS.c.procedure_fk)
                                 .where(STEPS.c.scheduled_start >= begin, STEPS.c.scheduled_start < end))
    with engine.connect() as db:
        rows = list(db.execute(
            select(PROCEDURES.c.id, PROCEDURES.c.state, PROCEDURES.c.created_at, PROCEDURES.c.accession_number,
                   PROCEDURES.c.description, PATIENTS.c.patient_id, PATIENTS.c.issuer, PATIENTS.c.patient_name)
            .join(ORDERS, ORDERS.c.id == PROCEDURES.c.order_fk).join(PATIENTS, PATIENTS.c.id == ORDERS.c.patient_fk)
            .where(on_day)))
        ids = [r.id for r in rows]
        steps: dict[int, list[Any]] = {i: [] for i in ids}
        reached: dict[int, dict[str, datetime]] = {i: {} for i in ids}
        if ids:
            for s in db.execute(select(STEPS.c.procedure_fk, STEPS.c.sps_status, STEPS.c.modality,
                                       STEPS.c.scheduled_station_name, STEPS.c.sps_location,
                                       STEPS.c.scheduled_station_ae_title, STEPS.c.scheduled_start)
                                .where(STEPS.c.procedure_fk.in_(ids)).order_by(STEPS.c.id)):
                steps[s.procedure_fk].append(s)
            for t in db.execute(select(PROCEDURE_TRANSITIONS.c.procedure_fk, PROCEDURE_TRANSITIONS.c.to_state,
                                       PROCEDURE_TRANSITIONS.c.at)
                                .where(PROCEDURE_TRANSITIONS.c.procedure_fk.in_(ids))
                                .order_by(PROCEDURE_TRANSITIONS.c.at, PROCEDURE_TRANSITIONS.c.id)):
                reached[t.procedure_fk].setdefault(t.to_state, t.at)
    found = [_day_procedure(r, steps[r.id], reached[r.id], zone) for r in rows]
    far = datetime.max.replace(tzinfo=zone)
    return sorted(found, key=lambda p: (p.first_start or far, p.facts.id))


def _day_procedure(row: Any, steps: list[Any], reached: dict[str, datetime], zone: ZoneInfo) -> DayProcedure:
    first = steps[0] if steps else None
    waiting = [s.scheduled_start for s in steps if s.sps_status in NOT_STARTED_STEPS and s.scheduled_start]
    earliest = min(waiting) if waiting else (first.scheduled_start if first is not None else None)
    images = [reached[s] for s in IMAGES_STATES if s in reached]
    facts = ProcedureFacts(
        id=row.id, modality=first.modality if first is not None else "", state=row.state,
        ordered_at=recorded(row.created_at, zone), scheduled_start=scheduled(earliest, zone),
        started_at=recorded(reached.get("STARTED"), zone), completed_at=recorded(reached.get("COMPLETED"), zone),
        images_at=recorded(min(images), zone) if images else None)
    room = (first.scheduled_station_name or first.sps_location or first.scheduled_station_ae_title) if first else ""
    return DayProcedure(facts, row.accession_number, row.patient_id, row.issuer, row.patient_name,
                        row.description, room or "", scheduled(first.scheduled_start if first else None, zone))


def read_timeline(engine: Engine, procedure_id: int, zone: ZoneInfo) -> list[dict[str, Any]] | None:
    """One procedure's history, oldest first, each entry with its time (ISO, the board's zone), the state
    reached, the readable cause and, apart, the raw cause and the event's reference (UID or HL7 control
    ID); None for an unknown procedure."""
    with engine.connect() as db:
        created = db.execute(select(PROCEDURES.c.created_at).where(PROCEDURES.c.id == procedure_id)).first()
        if created is None:
            return None
        transitions = list(db.execute(select(PROCEDURE_TRANSITIONS)
                                      .where(PROCEDURE_TRANSITIONS.c.procedure_fk == procedure_id)
                                      .order_by(PROCEDURE_TRANSITIONS.c.at, PROCEDURE_TRANSITIONS.c.id)))
        refs = {t.event_ref for t in transitions if t.event_ref}
        senders: dict[tuple[str, str], str] = {}
        if refs:
            for kind, column, ae in (("mpps", MPPS.c.sop_instance_uid, MPPS.c.calling_ae),
                                     ("ian", IAN_NOTIFICATIONS.c.sop_instance_uid, IAN_NOTIFICATIONS.c.calling_ae),
                                     ("stgcmt", COMMITMENT_REQUESTS.c.transaction_uid,
                                      COMMITMENT_REQUESTS.c.archive_ae)):
                for ref, station in db.execute(select(column, ae).where(column.in_(refs))):
                    senders[(kind, ref)] = station
    entries = [{"at": _iso(recorded(created.created_at, zone)), "from": "", "to": "SCHEDULED",
                "text": "Order received", "cause": "order received", "kind": "", "ref": ""}]
    for t in transitions:
        station = senders.get((t.event_kind, t.event_ref), "")
        entries.append({"at": _iso(recorded(t.at, zone)), "from": t.from_state, "to": t.to_state,
                        "text": readable(t.event_kind, t.event_ref, t.cause, station), "cause": t.cause,
                        "kind": t.event_kind, "ref": t.event_ref})
    return entries


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment is not None else None
