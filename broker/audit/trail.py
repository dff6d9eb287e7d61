"""Recording audit events: in the caller's transaction for changes, batched for reads and alerts.

* :func:`record` adds the record to the transaction of the change it records: the record and the
  change are committed together or not at all.
* :class:`AuditWriter` takes events that belong to no transaction (a C-FIND, a REST read, a refused
  association, a failed handshake) without blocking the caller, and inserts them in batches every
  ``audit_flush_interval`` seconds (one commit for many queries: recording every C-FIND must not cost
  the worklist its speed). What is still in memory when the process is killed is lost; a clean stop
  flushes it.
* :func:`broker_participant` is the broker itself as an ActiveParticipant.

Recorded rows are the audit outbox: a shipper (:mod:`broker.audit.shipper`) delivers the undelivered
ones, oldest first, to the Audit Record Repository and marks them delivered.

The writer's queue never drops a record and never makes the caller wait. When the database cannot
keep up (or is down) the queue grows past :data:`BACKLOG_WARNING`: the writer logs ``audit.backlog``
(again each time the backlog doubles) and keeps everything, trading memory for a complete trail; a
failed insert keeps its batch at the head of the queue and is retried at the next interval.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import structlog
from sqlalchemy import Connection, Engine, Insert, bindparam, insert, select

from broker.audit.events import AuditEvent, Participant
from broker.audit.stored import to_json
from broker.store.prepared import Prepared
from broker.store.tables import AuditRecord, AuditRecordPatient, table_of

log = structlog.get_logger(__name__)

BACKLOG_WARNING = 50_000
"""Queued events past which the writer warns (``audit.backlog``); none is dropped."""

EARLY_FLUSH = 2_000
"""Queued events at which the writer flushes without waiting for the interval (one INSERT batch)."""

_records = table_of(AuditRecord)
_patients = table_of(AuditRecordPatient)
_INSERT_MANY: Insert = insert(_records).returning(_records.c.id, sort_by_parameter_order=True)
_INSERT_PATIENTS: Insert = insert(_patients)
# record() runs in the HL7 intake's transaction of every order: its statements are Prepared, as the
# intake's own (broker.store.prepared), the key comes from lastrowid on SQLite (no RETURNING), and on
# PostgreSQL a record naming one patient (every Order / Patient / Procedure Record) is one statement.
_RECORD_RETURNING = Prepared(insert(_records).returning(_records.c.id))
_RECORD_PLAIN = Prepared(insert(_records))
_RECORD_PATIENT = Prepared(insert(_patients))
_new_record = insert(_records).values(
    {c.name: bindparam(c.name, type_=c.type) for c in _records.c if c.name != "id"}).returning(_records.c.id).cte("r")
_RECORD_WITH_PATIENT = Prepared(insert(_patients).from_select(
    ["patient_id", "record_id"], select(bindparam("patient_id", type_=_patients.c.patient_id.type), _new_record.c.id)))


def _local(now: datetime) -> datetime:
    """The naive local time the broker's tables store (an aware ``now`` is converted)."""
    return now.astimezone().replace(tzinfo=None) if now.tzinfo is not None else now


def _row(event: AuditEvent, now: datetime) -> dict[str, Any]:
    requestor = event.requestor
    return {
        "recorded_at": _local(now),
        "event_id": event.event_id[0],
        "event_type": event.event_type[0][0] if event.event_type else "",
        "action": event.action,
        "outcome": event.outcome,
        "user_id": requestor.user_id[:200] if requestor else "",
        "host": requestor.host[:200] if requestor else "",
        "event": to_json(event),
        "delivered_at": None,
        "attempts": 0,
    }


def _searchable_ids(patient_ids: Sequence[str]) -> dict[str, None]:
    """Each ``id^^^issuer`` also under its bare Patient ID, so that a search by the ID alone finds it."""
    found: dict[str, None] = {}
    for patient_id in patient_ids:
        if patient_id:
            found[patient_id[:200]] = None
            bare = patient_id.split("^", 1)[0]
            if bare:
                found[bare[:200]] = None
    return found


def _patient_rows(record_id: int, event: AuditEvent) -> list[dict[str, Any]]:
    return [{"record_id": record_id, "patient_id": patient_id} for patient_id in _searchable_ids(event.patient_ids)]


def record(db: Connection, event: AuditEvent, now: datetime) -> None:
    """Add ``event`` to the caller's transaction (nothing is recorded if it rolls back)."""
    row = _row(event, now)
    patients = list(_searchable_ids(event.patient_ids))
    if db.dialect.name == "postgresql" and len(patients) == 1:
        _RECORD_WITH_PATIENT.rowcount(db, {**row, "patient_id": patients[0]})
        return
    record_id = (_RECORD_PLAIN.lastrowid(db, row) if db.dialect.name == "sqlite"
                 else _RECORD_RETURNING.scalar(db, row))
    for patient_id in patients:
        _RECORD_PATIENT.rowcount(db, {"record_id": record_id, "patient_id": patient_id})


def record_many(db: Connection, batch: Sequence[tuple[AuditEvent, datetime]]) -> None:
    """Add several events in one multi-row INSERT (the writer's batches), keeping their order in ``id``."""
    if not batch:
        return
    if not any(event.patient_ids for event, _ in batch):
        db.execute(insert(_records), [_row(event, now) for event, now in batch])
        return
    ids = db.execute(_INSERT_MANY, [_row(event, now) for event, now in batch]).scalars().all()
    patients = [row for record_id, (event, _) in zip(ids, batch, strict=True)
                for row in _patient_rows(record_id, event)]
    if patients:
        db.execute(_INSERT_PATIENTS, patients)


class AuditWriter:
    """Batched recording of events outside any transaction; thread-safe, never blocks the caller.

    ``submit`` appends to an in-memory queue under a lock held for an append; a background thread
    commits the queue every ``flush_interval`` seconds (sooner when :data:`EARLY_FLUSH` events wait),
    in submission order. See the module docstring for what happens when the database falls behind.
    """

    def __init__(self, engine: Engine, flush_interval: float) -> None:
        self._engine = engine
        self._interval = max(flush_interval, 0.01)
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one flush at a time: batches commit in order
        self._queue: list[tuple[AuditEvent, datetime]] = []
        self._warn_at = BACKLOG_WARNING
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def submit(self, event: AuditEvent) -> None:
        """Queue ``event``; it is committed within ``flush_interval`` seconds."""
        now = datetime.now()
        with self._lock:
            self._queue.append((event, now))
            queued = len(self._queue)
            warn = queued >= self._warn_at
            if warn:
                self._warn_at *= 2
        if warn:
            log.warning("audit.backlog", queued=queued)
        if queued >= EARLY_FLUSH:
            self._wake.set()

    @property
    def queued(self) -> int:
        """Events submitted and not committed yet."""
        with self._lock:
            return len(self._queue)

    def flush(self) -> None:
        """Commit everything queued so far (tests, and before a stop); raises if the database fails."""
        with self._flushing:
            with self._lock:
                batch, self._queue = self._queue, []
            if not batch:
                return
            try:
                with self._engine.begin() as db:
                    record_many(db, batch)
            except BaseException:
                with self._lock:
                    self._queue[:0] = batch  # kept, in order, for the next try
                raise
            with self._lock:
                if len(self._queue) < BACKLOG_WARNING:
                    self._warn_at = BACKLOG_WARNING

    def close(self) -> None:
        """Flush and stop the background thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        try:
            self.flush()
        except Exception as exc:  # a failing database at stop: say what is lost
            log.error("audit.write_failed", queued=self.queued, error=type(exc).__name__, at_stop=True)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:  # kept and retried at the next interval
                log.warning("audit.write_failed", queued=self.queued, error=type(exc).__name__)


_HOST = socket.gethostname()


def broker_participant(ae_title: str,
                       role: Literal["source", "destination", "application", ""] = "destination") -> Participant:
    """The broker as an ActiveParticipant: its AE title, host name and process id."""
    return Participant(ae_title, _HOST, is_requestor=False, role=role, alternative_user_id=str(os.getpid()))
