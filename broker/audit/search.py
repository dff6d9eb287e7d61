"""Searching the audit trail by time, patient, user and event: what ``broker audit`` and ``GET /api/audit``
answer. Each filter is served by an index (``recorded_at``, ``audit_record_patients``, ``user_id``,
``event_id``); newest records first."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select

from broker.audit import events
from broker.audit.stored import from_json
from broker.audit.xml import render
from broker.store.tables import AuditRecord, AuditRecordPatient, table_of

_records = table_of(AuditRecord)
_patients = table_of(AuditRecordPatient)

EVENTS: dict[str, str] = {
    "application": events.APPLICATION_ACTIVITY[0],
    "order": events.ORDER_RECORD[0],
    "patient": events.PATIENT_RECORD[0],
    "procedure": events.PROCEDURE_RECORD[0],
    "query": events.QUERY[0],
    "security": events.SECURITY_ALERT[0],
}
"""The event names a search accepts, with the EventID code each stands for (a code is accepted too)."""
_NAMES = {code: name for name, code in EVENTS.items()}
MAX_LIMIT = 10_000


@dataclass(frozen=True)
class AuditFilter:
    """What to look for; an empty field does not filter. ``user``: the requestor's UserID (an AE title,
    ``application^facility``, ``token <label>``); ``patient``: a Patient ID (with or without ``^^^issuer``)."""

    since: datetime | None = None
    until: datetime | None = None
    patient: str = ""
    user: str = ""
    event: str = ""
    limit: int = 100


def event_code(name: str) -> str:
    """The EventID code for an event name or code; ValueError for an unknown one."""
    if name in EVENTS:
        return EVENTS[name]
    if name in _NAMES:
        return name
    raise ValueError(f"unknown audit event {name!r} (one of {', '.join(EVENTS)}, or an EventID code)")


def search(engine: Engine, wanted: AuditFilter, *, source_id: str = "", site_id: str = "") -> list[dict[str, Any]]:
    """The matching records, newest first, each with its fields and its DICOM audit message (``xml``)."""
    query = select(_records).order_by(_records.c.id.desc()).limit(max(1, min(wanted.limit, MAX_LIMIT)))
    if wanted.since is not None:
        query = query.where(_records.c.recorded_at >= wanted.since)
    if wanted.until is not None:
        query = query.where(_records.c.recorded_at < wanted.until)
    if wanted.user:
        query = query.where(_records.c.user_id == wanted.user)
    if wanted.event:
        query = query.where(_records.c.event_id == event_code(wanted.event))
    if wanted.patient:
        query = query.where(_records.c.id.in_(select(_patients.c.record_id)
                                              .where(_patients.c.patient_id == wanted.patient)))
    with engine.connect() as db:
        rows = db.execute(query).mappings().all()
    source = source_id or socket.gethostname()
    found = []
    for row in rows:
        event = from_json(row["event"])
        found.append({
            "id": row["id"],
            "recorded_at": row["recorded_at"].isoformat(),
            "event": _NAMES.get(row["event_id"], row["event_id"]),
            "event_id": row["event_id"],
            "event_type": row["event_type"],
            "action": row["action"],
            "outcome": row["outcome"],
            "user_id": row["user_id"],
            "host": row["host"],
            "patient_ids": list(event.patient_ids),
            "delivered_at": row["delivered_at"].isoformat() if row["delivered_at"] else None,
            "attempts": row["attempts"],
            "xml": render(event, source_id=source, site_id=site_id, when=row["recorded_at"]),
        })
    return found
