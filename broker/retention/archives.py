"""The inbound HL7 archive, done outbox events and records no procedure links: deleted after their age.

- HL7 messages (``inbound_messages``) received before ``retention_hl7_days``, except those a step or
  procedure transition still links to (the message behind a kept timeline line) and messages still
  ``received`` (never processed: a person should see them). Repeats (``duplicate_of_id``) go first, then
  originals no repeat points to. MSH-10 de-duplication looks for the original among the stored
  messages: a repeat of a message older than the retention is processed as a new message (a new
  order of a number that exists is refused as a duplicate key, a status change applied again).
- Done outbox events older than ``retention_outbox_days`` (by ``done_at``); failed ones are kept for a
  person (``broker events failed``).
- UPS event reports for a WebSocket subscriber (``ups.ws_event``) still waiting after
  ``retention_channel_report_hours``: the subscriber's channel never opened to take them. They are marked
  failed, not deleted (a DIMSE subscriber's reports end the same way after their retries), so
  ``broker events failed`` shows them and ``retry`` queues them again; without this a subscription whose
  client went away for good would grow the outbox for ever.
- MPPS instances never linked to a step (unscheduled, kept for reconciliation) once final and unchanged
  for ``retention_procedure_days``, and instance availability and IAN rows that name no procedure.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Table, delete, exists, func, not_, select, update

from broker.outbox.outbox import OUTBOX, UPS_WS_EVENT
from broker.store.tables import (
    IanNotification,
    InboundMessage,
    InstanceAvailability,
    MppsInstance,
    ProcedureTransition,
    StepTransition,
    table_of,
)

MESSAGES = table_of(InboundMessage)
STEP_TRANSITIONS = table_of(StepTransition)
PROCEDURE_TRANSITIONS = table_of(ProcedureTransition)
MPPS = table_of(MppsInstance)
AVAILABILITY = table_of(InstanceAvailability)
IAN = table_of(IanNotification)


def _in_batches(engine: Engine, table: Table, conditions: list[Any], batch_size: int, dry_run: bool) -> int:
    """Delete (or count) the rows of ``table`` meeting ``conditions``, ``batch_size`` per transaction."""
    if dry_run:
        with engine.connect() as db:
            return int(db.execute(select(func.count()).select_from(table).where(*conditions)).scalar_one())
    deleted = 0
    last_id = 0
    while True:
        with engine.begin() as db:
            ids = list(db.execute(select(table.c.id).where(*conditions, table.c.id > last_id)
                                  .order_by(table.c.id).limit(batch_size)).scalars())
            if not ids:
                return deleted
            deleted += db.execute(delete(table).where(table.c.id.in_(ids))).rowcount or 0
        last_id = ids[-1]


def purge_messages(engine: Engine, before: datetime | None, batch_size: int, dry_run: bool) -> int:
    """The HL7 archive rows past their retention that nothing links to; returns how many."""
    if before is None:
        return 0
    other = MESSAGES.alias("repeat")
    unlinked = [
        MESSAGES.c.received_at < before, MESSAGES.c.status != "received",
        not_(exists().where(STEP_TRANSITIONS.c.inbound_message_fk == MESSAGES.c.id)),
        not_(exists().where(PROCEDURE_TRANSITIONS.c.inbound_message_fk == MESSAGES.c.id)),
    ]
    repeats = _in_batches(engine, MESSAGES, [*unlinked, MESSAGES.c.duplicate_of_id.is_not(None)], batch_size,
                          dry_run)
    originals = [*unlinked, MESSAGES.c.duplicate_of_id.is_(None)]
    if dry_run:  # the repeats a real pass deletes first would no longer hold their originals back
        held_by_old_repeat_only = not_(exists().where(other.c.duplicate_of_id == MESSAGES.c.id,
                                                      other.c.received_at >= before))
        return repeats + _in_batches(engine, MESSAGES, [*originals, held_by_old_repeat_only], batch_size, True)
    originals.append(not_(exists().where(other.c.duplicate_of_id == MESSAGES.c.id)))
    return repeats + _in_batches(engine, MESSAGES, originals, batch_size, False)


def purge_outbox(engine: Engine, before: datetime | None, batch_size: int, dry_run: bool) -> int:
    """Done outbox events finished before ``before``; returns how many."""
    if before is None:
        return 0
    return _in_batches(engine, OUTBOX, [OUTBOX.c.status == "done", OUTBOX.c.done_at < before], batch_size, dry_run)


def fail_channel_reports(engine: Engine, before: datetime | None, batch_size: int, dry_run: bool) -> int:
    """Mark failed the WebSocket subscribers' reports created before ``before`` and still pending; returns
    how many. Each row's error names the cut-off, so whoever looks knows why it stopped waiting."""
    if before is None:
        return 0
    conditions = [OUTBOX.c.kind == UPS_WS_EVENT, OUTBOX.c.status == "pending", OUTBOX.c.created_at < before]
    if dry_run:
        with engine.connect() as db:
            return int(db.execute(select(func.count()).select_from(OUTBOX).where(*conditions)).scalar_one())
    error = f"no WebSocket channel took this report before {before:%Y-%m-%d %H:%M}"
    failed = 0
    while True:
        with engine.begin() as db:
            ids = list(db.execute(select(OUTBOX.c.id).where(*conditions).order_by(OUTBOX.c.id)
                                  .limit(batch_size)).scalars())
            if not ids:
                return failed
            failed += db.execute(update(OUTBOX).where(OUTBOX.c.id.in_(ids), OUTBOX.c.status == "pending")
                                 .values(status="failed", last_error=error, lease_until=None)).rowcount or 0


def purge_unlinked(engine: Engine, before: datetime | None, batch_size: int, dry_run: bool) -> int:
    """MPPS, instance availability and IAN rows no procedure links to, past the procedure retention."""
    if before is None:
        return 0
    return (_in_batches(engine, MPPS, [MPPS.c.procedure_fk.is_(None), MPPS.c.step_fk.is_(None),
                                       MPPS.c.status != "IN PROGRESS", MPPS.c.updated_at < before],
                        batch_size, dry_run)
            + _in_batches(engine, AVAILABILITY, [AVAILABILITY.c.procedure_fk.is_(None),
                                                 AVAILABILITY.c.updated_at < before], batch_size, dry_run)
            + _in_batches(engine, IAN, [IAN.c.procedure_fk.is_(None), IAN.c.received_at < before],
                          batch_size, dry_run))
