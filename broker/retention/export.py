"""The export of a purged procedure: its summary and timeline as one JSON line, before it is deleted.

One file per day of purging (``retention-YYYYMMDD.jsonl`` under ``retention_export_dir``), appended,
created with mode 0600 in a directory of mode 0700: the lines name patients (Patient ID and issuer,
never the name) and studies. Each batch's lines are written and flushed to disk (fsync) before the
batch's delete commits, so a procedure is never deleted unexported; a crash between the two exports
that batch again at the next pass (a repeated line, never a missing one).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, select

from broker.store.tables import MPPS, ORDERS, PATIENTS, PROCEDURE_TRANSITIONS, PROCEDURES, STEP_TRANSITIONS, STEPS


def export_path(export_dir: Path, now: datetime) -> Path:
    return export_dir / f"retention-{now:%Y%m%d}.jsonl"


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment is not None else ""


def summaries(db: Connection, procedure_pks: Sequence[int], now: datetime) -> list[dict[str, Any]]:
    """Each procedure's summary with its steps, their transitions, its MPPS and its timeline."""
    heads = db.execute(
        select(PROCEDURES, ORDERS.c.sender, ORDERS.c.placer_order_number, ORDERS.c.placer_issuer,
               ORDERS.c.filler_order_number, ORDERS.c.filler_issuer, PATIENTS.c.patient_id, PATIENTS.c.issuer)
        .join(ORDERS, ORDERS.c.id == PROCEDURES.c.order_fk).join(PATIENTS, PATIENTS.c.id == ORDERS.c.patient_fk)
        .where(PROCEDURES.c.id.in_(procedure_pks)).order_by(PROCEDURES.c.id)).all()
    steps = db.execute(select(STEPS.c.id, STEPS.c.procedure_fk, STEPS.c.sps_id, STEPS.c.sps_status, STEPS.c.modality,
                              STEPS.c.scheduled_station_ae_title, STEPS.c.scheduled_start)
                       .where(STEPS.c.procedure_fk.in_(procedure_pks)).order_by(STEPS.c.id)).all()
    step_lines: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for t in db.execute(select(STEP_TRANSITIONS).where(STEP_TRANSITIONS.c.step_fk.in_([s.id for s in steps]))
                        .order_by(STEP_TRANSITIONS.c.id)):
        step_lines[t.step_fk].append({"at": _when(t.at), "from": t.from_status, "to": t.to_status, "cause": t.cause})
    by_procedure: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for s in steps:
        by_procedure[s.procedure_fk].append({
            "sps_id": s.sps_id, "status": s.sps_status, "modality": s.modality,
            "station_ae_title": s.scheduled_station_ae_title, "scheduled_start": _when(s.scheduled_start),
            "transitions": step_lines[s.id]})
    timelines: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for t in db.execute(select(PROCEDURE_TRANSITIONS).where(PROCEDURE_TRANSITIONS.c.procedure_fk.in_(procedure_pks))
                        .order_by(PROCEDURE_TRANSITIONS.c.id)):
        timelines[t.procedure_fk].append({"at": _when(t.at), "from": t.from_state, "to": t.to_state, "cause": t.cause,
                                          "event_kind": t.event_kind, "event_ref": t.event_ref})
    mpps: dict[int, list[dict[str, str]]] = defaultdict(list)
    for m in db.execute(select(MPPS.c.procedure_fk, MPPS.c.sop_instance_uid, MPPS.c.status)
                        .where(MPPS.c.procedure_fk.in_(procedure_pks)).order_by(MPPS.c.id)):
        mpps[m.procedure_fk].append({"sop_instance_uid": m.sop_instance_uid, "status": m.status})
    return [{
        "purged_at": _when(now),
        "patient": {"patient_id": h.patient_id, "issuer": h.issuer},
        "order": {"sender": h.sender, "placer_order_number": h.placer_order_number, "placer_issuer": h.placer_issuer,
                  "filler_order_number": h.filler_order_number, "filler_issuer": h.filler_issuer},
        "procedure": {"accession_number": h.accession_number, "requested_procedure_id": h.requested_procedure_id,
                      "study_instance_uid": h.study_instance_uid, "description": h.description, "state": h.state,
                      "created_at": _when(h.created_at), "updated_at": _when(h.updated_at)},
        "steps": by_procedure[h.id],
        "timeline": timelines[h.id],
        "mpps": mpps[h.id],
    } for h in heads]


def write_lines(path: Path, documents: Sequence[dict[str, Any]]) -> None:
    """Append one JSON line per document and flush them to disk before returning."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = b"".join(orjson.dumps(d) + b"\n" for d in documents)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view):]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
