"""Reading procedures for the API, the live stream and the board: one summary shape everywhere.

A summary is a requested procedure with its order numbers, patient and steps (status, modality,
station, scheduled start). Filters on step attributes match a procedure when any of its steps matches.
The text filters are literal, never patterns (the board's ``matches`` in ``static/board.js`` applies the
same rules to the changes it is pushed): modality is compared upper-cased, station, status and
accession exactly, and patient is the Patient ID exactly or the start of the upper-cased name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, func, or_, select

from broker.store.tables import Order, Patient, RequestedProcedure, ScheduledStep, table_of

PROCEDURES = table_of(RequestedProcedure)
ORDERS = table_of(Order)
PATIENTS = table_of(Patient)
STEPS = table_of(ScheduledStep)


@dataclass(frozen=True)
class ProcedureFilter:
    """What the caller asked for; empty fields do not filter."""

    day: date | None = None
    modality: str = ""
    station: str = ""
    states: tuple[str, ...] = ()
    patient: str = ""
    accession_number: str = ""

    def conditions(self) -> list[ColumnElement[bool]]:
        step: list[ColumnElement[bool]] = []
        if self.day is not None:
            step.extend(day_range(self.day))
        if self.modality:
            step.append(STEPS.c.modality == self.modality.upper())
        if self.station:
            step.append(or_(STEPS.c.scheduled_station_ae_title == self.station,
                            STEPS.c.scheduled_station_name == self.station, STEPS.c.sps_location == self.station))
        found: list[ColumnElement[bool]] = []
        if step:  # IN (not EXISTS): the database starts from the steps' indexes (start, modality, station)
            found.append(PROCEDURES.c.id.in_(select(STEPS.c.procedure_fk).where(*step)))
        if self.states:
            found.append(PROCEDURES.c.state.in_(self.states))
        if self.patient:
            # the steps' upper-cased name column (Python's upper(): SQLite's upper() is ASCII only)
            found.append(PROCEDURES.c.id.in_(select(STEPS.c.procedure_fk).where(or_(
                STEPS.c.patient_id == self.patient,
                STEPS.c.patient_name_norm.like(prefix_pattern(self.patient.upper()), escape=LIKE_ESCAPE)))))
        if self.accession_number:
            found.append(PROCEDURES.c.accession_number == self.accession_number)
        return found


LIKE_ESCAPE = "\\"


def prefix_pattern(text: str) -> str:
    """A LIKE pattern for "starts with ``text``", every character literal (``%`` and ``_`` too, as the
    board's own ``startsWith`` takes them): the pattern is built here, not by concatenation in SQL, so
    the database sees a constant prefix and can use the name index."""
    literal = text.replace(LIKE_ESCAPE, LIKE_ESCAPE * 2).replace("%", LIKE_ESCAPE + "%").replace("_", LIKE_ESCAPE + "_")
    return literal + "%"


def day_range(day: date) -> list[ColumnElement[bool]]:
    """Steps scheduled on ``day``, as a range on the indexed combined start date-time."""
    start = datetime.combine(day, time())
    return [STEPS.c.scheduled_start >= start, STEPS.c.scheduled_start < start + timedelta(days=1)]


def _base() -> Select[Any]:
    return (select(PROCEDURES.c.id, PROCEDURES.c.accession_number, PROCEDURES.c.requested_procedure_id,
                   PROCEDURES.c.study_instance_uid, PROCEDURES.c.description, PROCEDURES.c.state,
                   PROCEDURES.c.created_at, PROCEDURES.c.updated_at, ORDERS.c.placer_order_number,
                   ORDERS.c.filler_order_number, PATIENTS.c.patient_id, PATIENTS.c.issuer,
                   PATIENTS.c.patient_name)
            .join(ORDERS, ORDERS.c.id == PROCEDURES.c.order_fk)
            .join(PATIENTS, PATIENTS.c.id == ORDERS.c.patient_fk))


def list_procedures(db: Connection, wanted: ProcedureFilter, limit: int, offset: int
                    ) -> tuple[int, list[dict[str, Any]]]:
    """(total matching, one page of summaries) ordered by the earliest scheduled start, then id."""
    conditions = wanted.conditions()
    counted = select(func.count()).select_from(
        PROCEDURES.join(ORDERS, ORDERS.c.id == PROCEDURES.c.order_fk)
        .join(PATIENTS, PATIENTS.c.id == ORDERS.c.patient_fk)).where(*conditions)
    total = int(db.execute(counted).scalar_one())
    start = (select(func.min(STEPS.c.scheduled_start)).where(STEPS.c.procedure_fk == PROCEDURES.c.id)
             .scalar_subquery())
    rows = list(db.execute(_base().where(*conditions).order_by(start.asc().nulls_last(), PROCEDURES.c.id)
                           .limit(limit).offset(offset)))
    return total, _with_steps(db, rows)


def summaries(db: Connection, procedure_pks: Iterable[int]) -> list[dict[str, Any]]:
    """The summaries of these procedures (those that exist), by id."""
    pks = sorted(set(procedure_pks))
    if not pks:
        return []
    return _with_steps(db, list(db.execute(_base().where(PROCEDURES.c.id.in_(pks)).order_by(PROCEDURES.c.id))))


def _with_steps(db: Connection, rows: list[Any]) -> list[dict[str, Any]]:
    steps: dict[int, list[dict[str, Any]]] = {row.id: [] for row in rows}
    if rows:
        for s in db.execute(select(STEPS.c.id, STEPS.c.procedure_fk, STEPS.c.sps_id, STEPS.c.sps_status,
                                   STEPS.c.modality, STEPS.c.scheduled_station_ae_title,
                                   STEPS.c.scheduled_station_name, STEPS.c.sps_location, STEPS.c.scheduled_start)
                            .where(STEPS.c.procedure_fk.in_(list(steps))).order_by(STEPS.c.id)):
            steps[s.procedure_fk].append({
                "id": s.id, "sps_id": s.sps_id, "status": s.sps_status, "modality": s.modality,
                "station_ae_title": s.scheduled_station_ae_title, "station_name": s.scheduled_station_name,
                "location": s.sps_location, "scheduled_start": _iso(s.scheduled_start)})
    return [summary(row, steps[row.id]) for row in rows]


def summary(row: Any, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """One procedure as the API and the board show it; ``modality`` / ``room`` / ``scheduled_start``
    are its first step's, for grouping."""
    first = steps[0] if steps else {}
    return {
        "id": row.id, "accession_number": row.accession_number,
        "requested_procedure_id": row.requested_procedure_id, "study_instance_uid": row.study_instance_uid,
        "description": row.description, "state": row.state, "ordered_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at), "placer_order_number": row.placer_order_number,
        "filler_order_number": row.filler_order_number, "patient_id": row.patient_id,
        "issuer_of_patient_id": row.issuer, "patient_name": row.patient_name,
        "modality": first.get("modality", ""),
        "room": first.get("station_name") or first.get("location") or first.get("station_ae_title") or "",
        "scheduled_start": first.get("scheduled_start"), "steps": steps}


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment is not None else None
