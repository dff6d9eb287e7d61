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
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, Engine

from broker.audit.events import AuditEvent, Participant


def record(db: Connection, event: AuditEvent, now: datetime) -> None:
    """Add ``event`` to the caller's transaction (nothing is recorded if it rolls back)."""
    raise NotImplementedError


class AuditWriter:
    """Batched recording of events outside any transaction; thread-safe, never blocks the caller."""

    def __init__(self, engine: Engine, flush_interval: float) -> None:
        raise NotImplementedError

    def submit(self, event: AuditEvent) -> None:
        """Queue ``event``; it is committed within ``flush_interval`` seconds."""
        raise NotImplementedError

    def flush(self) -> None:
        """Commit everything queued so far (tests, and before a stop)."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and stop the background thread."""
        raise NotImplementedError


def broker_participant(ae_title: str, role: str = "destination") -> Participant:
    """The broker as an ActiveParticipant: its AE title, host name and process id."""
    raise NotImplementedError
