"""Writing outbox rows inside the caller's transaction (the transactional outbox pattern).

A side effect (an HL7 status to the RIS, an MPPS forward, a commitment request) is decided in the same
transaction as the state change that causes it, as a row here; it is performed later by a task that
reads the row. So a committed change always gets its side effect (at least once), and a rolled-back
change never does.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert

from broker.store.tables import OutboxEvent, table_of

OUTBOX = table_of(OutboxEvent)
_INSERT = insert(OUTBOX)
# With RETURNING, SQLAlchemy sends a list of rows as multi-row INSERT ... VALUES statements
# ("insertmanyvalues"); without it the driver ran one INSERT per row (100 per UPS change, measured
# in PostgreSQL's statement log).
_INSERT_MANY = insert(OUTBOX).returning(OUTBOX.c.id)

# Event kinds; each has a handler in broker.events.handlers.
RIS_STATUS = "ris.status"
MPPS_FORWARD = "mpps.forward"
STGCMT_REQUEST = "stgcmt.request"
UPS_EVENT = "ups.event"  # one N-EVENT-REPORT to one UPS subscriber (broker.domain.ups_notify)
# The same report to a subscriber of the WebSocket channel (UPS-RS, PS3.18 11.13). No handler, never
# published by the relay: the row waits until a channel for its ordering key takes it
# (broker.outbox.consumer) and is marked done after the send.
UPS_WS_EVENT = "ups.ws_event"
CONSUMED_KINDS = frozenset({UPS_WS_EVENT})
"""Kinds read by a consumer of their ordering key, not run by the relay and the workers."""
_CONSUMED_KEYS = "outbox_consumed_keys"


def add_event(db: Connection, kind: str, payload: dict[str, Any], ordering_key: str, now: datetime) -> str:
    """Add one pending event to the caller's transaction; returns its event id (a UUID4).

    ``ordering_key``: events with the same key run one after the other in the order they were added
    (e.g. ``order:<pk>`` keeps the HL7 status messages of an order in order); '' = no ordering.
    """
    event_id = str(uuid.uuid4())
    db.execute(_INSERT, {"event_id": event_id, "kind": kind, "payload": payload, "ordering_key": ordering_key,
                         "status": "pending", "attempts": 0, "next_attempt_at": now, "lease_until": None,
                         "last_error": "", "created_at": now, "done_at": None})
    db.info["outbox_added"] = True
    if kind in CONSUMED_KINDS:
        db.info.setdefault(_CONSUMED_KEYS, set()).add(ordering_key)
    return event_id


def add_events(db: Connection, kind: str, events: list[tuple[dict[str, Any], str]], now: datetime) -> list[str]:
    """:func:`add_event` for many ``(payload, ordering_key)`` at once: multi-row INSERTs (a UPS change
    queues one event per subscriber; row by row that was a statement each)."""
    if not events:
        return []
    ids = [str(uuid.uuid4()) for _ in events]
    db.execute(_INSERT_MANY, [{"event_id": event_id, "kind": kind, "payload": payload, "ordering_key": key,
                          "status": "pending", "attempts": 0, "next_attempt_at": now, "lease_until": None,
                          "last_error": "", "created_at": now, "done_at": None}
                         for event_id, (payload, key) in zip(ids, events, strict=True)])
    db.info["outbox_added"] = True
    if kind in CONSUMED_KINDS:
        db.info.setdefault(_CONSUMED_KEYS, set()).update(key for _, key in events)
    return ids


def take_added_flag(db: Connection) -> bool:
    """Whether the transaction on ``db`` added outbox rows (and forget it): the caller wakes the relay."""
    return bool(db.info.pop("outbox_added", False))


def take_consumed_keys(db: Connection) -> set[str]:
    """The ordering keys of consumed kinds (:data:`CONSUMED_KINDS`) the transaction on ``db`` added rows
    to (and forget them): at its commit, the consumers of these keys in this process are woken."""
    keys: set[str] = db.info.pop(_CONSUMED_KEYS, set())
    return keys
