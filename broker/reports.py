"""What ``broker events`` and ``broker procedure`` print: read-only reports for the operator."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import ColumnElement, Engine, Row, select

from broker.outbox.outbox import OUTBOX
from broker.outbox.runner import retry_failed
from broker.store.tables import COMMITMENT_REQUESTS, MPPS, ORDERS, PROCEDURE_TRANSITIONS, PROCEDURES


def failed_event_rows(engine: Engine, limit: int | None = None, offset: int = 0) -> list[Row[Any]]:
    """The failed events, oldest first: id, event_id, kind, attempts, last_error, created_at, ordering_key
    (shared by ``broker events failed`` and the REST API)."""
    query = (select(OUTBOX.c.id, OUTBOX.c.event_id, OUTBOX.c.kind, OUTBOX.c.attempts, OUTBOX.c.last_error,
                    OUTBOX.c.created_at, OUTBOX.c.ordering_key)
             .where(OUTBOX.c.status == "failed").order_by(OUTBOX.c.id).offset(offset))
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as db:
        return list(db.execute(query))


def failed_events(engine: Engine) -> str:
    """A table of the failed events: id, kind, attempts, last error, created."""
    rows = failed_event_rows(engine)
    if not rows:
        return "no failed events"
    lines = [f"{'ID':>6}  {'KIND':<15} {'ATTEMPTS':>8}  {'CREATED':<19}  LAST ERROR"]
    for row in rows:
        error = " ".join(row.last_error.split())[:100]
        lines.append(f"{row.id:>6}  {row.kind:<15} {row.attempts:>8}  {row.created_at:%Y-%m-%d %H:%M:%S}  {error}")
    return "\n".join(lines)


def retry_event(engine: Engine, ident: str) -> bool:
    """Put a failed event back to pending; False when there is no failed event ``ident``."""
    return retry_failed(engine, ident)


def procedure_report(engine: Engine, accession: str, as_json: bool = False) -> str | None:
    """The procedure(s) with ``accession``: state, order numbers, timeline, MPPS and commitment."""
    reports = procedure_details(engine, PROCEDURES.c.accession_number == accession)
    if not reports:
        return None
    for report in reports:
        for extra in _DETAIL_ONLY:
            report.pop(extra)
        for line in report["timeline"]:
            line.pop("id")
    if as_json:
        return json.dumps(reports if len(reports) > 1 else reports[0], indent=2)
    return "\n\n".join(_human(r) for r in reports)


# Keys of procedure_details that the CLI report does not print (the REST API does).
_DETAIL_ONLY = ("id", "created_at")


def procedure_details(engine: Engine, condition: ColumnElement[bool]) -> list[dict[str, Any]]:
    """The procedures matching ``condition`` (on requested_procedures) with their timeline, MPPS and
    commitments, as plain data (shared by ``broker procedure`` and the REST API)."""
    with engine.connect() as db:
        procedures = list(db.execute(
            select(PROCEDURES, ORDERS.c.placer_order_number, ORDERS.c.filler_order_number)
            .join(ORDERS, ORDERS.c.id == PROCEDURES.c.order_fk)
            .where(condition).order_by(PROCEDURES.c.id)))
        reports: list[dict[str, Any]] = []
        for p in procedures:
            timeline = [{"id": t.id, "at": t.at.isoformat(sep=" ", timespec="seconds"), "from": t.from_state,
                         "to": t.to_state,
                         "cause": t.cause, "event": f"{t.event_kind} {t.event_ref}".strip()}
                        for t in db.execute(select(PROCEDURE_TRANSITIONS)
                                            .where(PROCEDURE_TRANSITIONS.c.procedure_fk == p.id)
                                            .order_by(PROCEDURE_TRANSITIONS.c.at, PROCEDURE_TRANSITIONS.c.id))]
            mpps = [{"sop_instance_uid": m.sop_instance_uid, "status": m.status}
                    for m in db.execute(select(MPPS.c.sop_instance_uid, MPPS.c.status)
                                        .where(MPPS.c.procedure_fk == p.id).order_by(MPPS.c.id))]
            commitments = [{"transaction_uid": r.transaction_uid, "status": r.status, "reason": r.reason}
                           for r in db.execute(select(COMMITMENT_REQUESTS)
                                               .where(COMMITMENT_REQUESTS.c.procedure_fk == p.id)
                                               .order_by(COMMITMENT_REQUESTS.c.id))]
            reports.append({
                "id": p.id, "created_at": p.created_at, "accession_number": p.accession_number,
                "requested_procedure_id": p.requested_procedure_id,
                "study_instance_uid": p.study_instance_uid, "placer_order_number": p.placer_order_number,
                "filler_order_number": p.filler_order_number, "state": p.state,
                "scheduled_at": p.created_at.isoformat(sep=" ", timespec="seconds"), "timeline": timeline,
                "mpps": mpps, "commitments": commitments})
    return reports


def _human(report: dict[str, Any]) -> str:
    lines = [f"Accession {report['accession_number']}  procedure {report['requested_procedure_id']}  "
             f"state {report['state']}",
             f"  order {report['placer_order_number']} / {report['filler_order_number']}  "
             f"study {report['study_instance_uid']}",
             f"  {report['scheduled_at']}  SCHEDULED                        order received"]
    for t in report["timeline"]:
        lines.append(f"  {t['at']}  {t['from'] or '-':>16} -> {t['to']:<16} {t['cause']}")
    for m in report["mpps"]:
        lines.append(f"  MPPS {m['sop_instance_uid']} {m['status']}")
    for c in report["commitments"]:
        lines.append(f"  Storage Commitment {c['transaction_uid']} {c['status']} {c['reason']}".rstrip())
    return "\n".join(lines)
