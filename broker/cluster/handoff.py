"""Leases held for as long as a holder keeps something open, handed to another holder on request.

The case: the associations to a UPS subscriber. Each process that delivers UPS events keeps its
association to a subscriber open between events, and the cluster must hold at most one association to
each subscriber at a time. A process holds the lease ``ups-association:<AE>`` while its association is
open (sending or idle). Another process that must send to that subscriber asks for the lease; while a
live holder has it, the asker marks the row (``wanted_by``) and waits, polling, for a bounded time. The
holder looks for such marks every :data:`POLL` seconds (one indexed query, on its reading engine), closes
its association when it is idle (or as soon as its delivery ends) and releases the lease, and the asker
takes it. A holder that died keeps the lease until it expires (``lease_seconds``); its connections died
with it, so only the asker's wait (then its event's retry) is the cost.

This class does the lease side and nothing about associations: the owner (the association pool of
:mod:`broker.outbound.ups_events`) calls :meth:`acquire` before it opens, :meth:`release` after it
closed, and :meth:`check` now and then, which renews the leases and answers which of them others want
and which were lost. Acquisitions are counted per name, so a holder with two associations to one
subscriber for a moment (a stale one being replaced) keeps the lease until both are closed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import structlog
from sqlalchemy import Engine

from broker.cluster import leases

log = structlog.get_logger(__name__)

POLL = 0.1
"""Seconds between a holder's looks for requests to let go (one indexed query on its reading engine)."""
ASK_POLL = 0.02
"""Seconds between an asker's tries while it waits."""


class HandOffLeases:
    """The hand-off leases of one holder (a process's association pool)."""

    def __init__(self, engine: Engine, holder: str, lease_seconds: float, *, reader: Engine | None = None) -> None:
        self.engine = engine
        self.reader = reader or engine
        self.holder = holder
        self.lease_seconds = lease_seconds
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()
        self._renewed = time.monotonic()

    def held(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def acquire(self, name: str, wait: float) -> bool:
        """Take ``name`` (or count one more use of it), asking its live holder to let go and waiting up to
        ``wait`` seconds for that; returns whether it is this holder's now."""
        return name in self.acquire_many([name], wait)

    def acquire_many(self, names: list[str], wait: float) -> set[str]:
        """:meth:`acquire` for several names at once, their waits side by side (one wait for a batch of
        subscribers, not one after the other); returns the names this holder holds now (one use more
        each)."""
        got: set[str] = set()
        pending: list[str] = []
        with self._lock:
            for name in dict.fromkeys(names):
                if self._held[name]:
                    self._held[name] += 1
                    got.add(name)
                else:
                    pending.append(name)
        deadline = time.monotonic() + wait
        asked: set[str] = set()
        while pending:
            waiting = []
            for name in pending:
                if leases.try_acquire(self.engine, name, self.holder, self.lease_seconds):
                    with self._lock:
                        self._held[name] += 1
                    got.add(name)
                    if name in asked:
                        log.info("cluster.handed_over", lease=name, holder=self.holder)
                else:
                    waiting.append(name)
            pending = waiting
            if not pending:
                break
            if time.monotonic() >= deadline:
                log.warning("cluster.hand_over_timeout", leases=pending, holder=self.holder, waited=wait)
                break
            for name in pending:  # again each time: another holder may have taken it meanwhile
                leases.want(self.engine, name, self.holder)
                asked.add(name)
            time.sleep(min(ASK_POLL, max(0.0, deadline - time.monotonic())))
        return got

    def release(self, name: str) -> None:
        """One use of ``name`` ended; the lease is let go when none is left."""
        with self._lock:
            if not self._held[name]:
                return
            self._held[name] -= 1
            if self._held[name]:
                return
            del self._held[name]
        try:
            leases.release(self.engine, name, self.holder)
        except Exception as exc:  # the database is away: the lease expires by itself
            log.warning("cluster.release_failed", lease=name, error=type(exc).__name__)

    def check(self) -> tuple[set[str], set[str]]:
        """Renew the held leases when a third of their time has passed, and look for requests; returns
        (the held leases another holder asked for, the held leases lost to another holder after they
        expired: the owner must stop using what they guard)."""
        held = self.held()
        if not held:
            return set(), set()
        lost: set[str] = set()
        if time.monotonic() - self._renewed >= self.lease_seconds / 3:
            self._renewed = time.monotonic()
            lost = held - leases.renew_all(self.engine, self.holder, sorted(held), self.lease_seconds)
            for name in lost:
                log.warning("cluster.lease_lost", lease=name, holder=self.holder)
                with self._lock:
                    self._held.pop(name, None)
        return leases.wanted_of(self.reader, self.holder) & held, lost
