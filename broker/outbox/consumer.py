"""Consuming one ordering key's pending outbox rows directly, instead of through the relay and workers.

Some events can only be delivered while their receiver is connected to the broker: the UPS event
reports of a WebSocket subscriber (:data:`~broker.outbox.outbox.UPS_WS_EVENT`) go over the channel the
subscriber opened to one node. The relay never publishes those kinds (:data:`CONSUMED_KINDS`); they
wait in the outbox, in ``id`` order under their ordering key, until the holder of the key's channel
reads them (:func:`pending`), sends them and marks them done (:func:`mark_done`). Done rows leave with
the outbox retention like any other.

A consumer learns of new rows two ways: it polls (another process or node committed them), and in this
process it is woken at the commit of a transaction that added rows to its key (:func:`watch`): the
outbox remembers the keys on the connection (:func:`broker.outbox.outbox.take_consumed_keys`) and a
listener on every engine's commit calls the watchers of those keys. SQLAlchemy's ``commit`` event comes
just before the database commits, so a woken consumer that finds nothing may look once more a moment
later (see :mod:`broker.web.dicomweb.channel`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Connection, Engine, bindparam, event, select, update

from broker.outbox.outbox import CONSUMED_KINDS, OUTBOX, take_consumed_keys
from broker.outbox.runner import Event

__all__ = ["CONSUMED_KINDS", "mark_done", "pending", "unwatch", "watch"]

_PENDING = (select(OUTBOX.c.id, OUTBOX.c.event_id, OUTBOX.c.kind, OUTBOX.c.payload, OUTBOX.c.ordering_key,
                   OUTBOX.c.attempts)
            .where(OUTBOX.c.ordering_key.in_(bindparam("keys", expanding=True)), OUTBOX.c.kind == bindparam("kind"),
                   OUTBOX.c.status == "pending")
            .order_by(OUTBOX.c.id).limit(bindparam("limit")))
_DONE = (update(OUTBOX).where(OUTBOX.c.id.in_(bindparam("pks", expanding=True)), OUTBOX.c.status == "pending")
         .values(status="done", done_at=bindparam("at"), lease_until=None, last_error=""))

_lock = threading.Lock()
_watchers: dict[str, list[Callable[[], None]]] = {}
_installed = False


def pending(engine: Engine, keys: list[str], kind: str, limit: int = 1000) -> list[Event]:
    """The first ``limit`` pending events of ``kind`` under any of ``keys``, in ``id`` (commit) order,
    so each key's in its order (one query for all the keys a process consumes)."""
    if not keys:
        return []
    with engine.connect() as db:
        return [Event(row.id, row.event_id, row.kind, row.payload, row.ordering_key, row.attempts)
                for row in db.execute(_PENDING, {"keys": keys, "kind": kind, "limit": limit})]


def mark_done(engine: Engine, pks: list[int], now: datetime) -> int:
    """Mark the delivered events done (those still pending); returns how many were."""
    if not pks:
        return 0
    with engine.begin() as db:
        return int(db.execute(_DONE, {"pks": pks, "at": now}).rowcount or 0)


def watch(key: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` (from the committing thread: it must only signal) whenever a transaction of
    this process commits rows of a consumed kind under ``key``."""
    global _installed
    with _lock:
        if not _installed:
            event.listen(Engine, "commit", _committed)
            event.listen(Engine, "rollback", _rolled_back)
            _installed = True
        _watchers.setdefault(key, []).append(callback)


def unwatch(key: str, callback: Callable[[], None]) -> None:
    """Stop calling ``callback`` for ``key``."""
    with _lock:
        callbacks = _watchers.get(key, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            _watchers.pop(key, None)


def _committed(db: Connection) -> None:
    keys = take_consumed_keys(db)
    if not keys:
        return
    with _lock:
        callbacks = [callback for key in keys for callback in _watchers.get(key, ())]
    for callback in callbacks:
        callback()


def _rolled_back(db: Connection) -> None:
    take_consumed_keys(db)  # the rows are gone with the transaction
