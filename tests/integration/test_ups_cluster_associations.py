"""One association at a time to a UPS subscriber for the whole cluster, on SQLite and PostgreSQL.

Two event paths on one database (two relays, two in-process workers, each with its own association
pool: two nodes' workers) deliver the events of one subscriber, a pynetdicom AE that counts the
connections open at the same moment. Each pool keeps its association open between events, so without
the association lease both would keep one; with it, a pool that must send asks the other to let go.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from pynetdicom import evt
from sqlalchemy import Engine, insert

from broker.cluster import leases
from broker.domain import ups_view as view
from broker.events.wiring import EventPath
from broker.outbound.ups_events import association_lease
from broker.store.tables import UpsSubscription, table_of
from broker.ups.service import UpsService
from tests.dicom_support import wait_until
from tests.integration.test_ups_events import Subscriber
from tests.integration.test_ups_scp import ups_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class Counting(Subscriber):
    """A subscriber that records how many connections to it are open at once (at most)."""

    def start(self) -> Counting:
        super().start()
        self.open_now = self.most_open = self.connections = 0
        self.count_lock = threading.Lock()
        self.server.bind(evt.EVT_CONN_OPEN, self._opened)
        self.server.bind(evt.EVT_CONN_CLOSE, self._closed)
        return self

    def _opened(self, event: Any) -> None:
        with self.count_lock:
            self.open_now += 1
            self.connections += 1
            self.most_open = max(self.most_open, self.open_now)

    def _closed(self, event: Any) -> None:
        with self.count_lock:
            self.open_now -= 1


@pytest.fixture
def subscriber(engine: Engine) -> Iterator[Counting]:
    counting = Counting("SUBSCRIBER").start()
    with engine.begin() as db:
        db.execute(insert(table_of(UpsSubscription)).values(
            subscriber_ae="SUBSCRIBER", workitem_uid=view.GLOBAL_SUBSCRIPTION, is_global=True, deletion_lock=False,
            created_at=datetime.now()))
    yield counting
    counting.stop()


def test_two_workers_never_hold_two_associations_to_one_subscriber(engine: Engine, database_url: str,
                                                                   subscriber: Counting) -> None:
    settings = ups_settings(database_url, subscriber.peer(), event_poll_interval=0.05, event_backoff_base=0.2,
                            event_backoff_max=1)
    paths = [EventPath.start(settings, engine) for _ in range(2)]
    ups = UpsService(engine)
    statuses = ["RESTARTED" if n % 2 else "GOING DOWN" for n in range(24)]
    try:
        for status in statuses:  # one at a time: each is its own head, taken by either node's relay
            ups.scp_status_change(status)
            time.sleep(0.15)
        wait_until(lambda: len(subscriber.received) >= len(statuses), seconds=30, what="every report")
        time.sleep(0.5)
        holders = {leases.holder_of(engine, association_lease("SUBSCRIBER"))}
    finally:
        for path in paths:
            path.stop()
    assert [str(r.info.SCPStatus) for r in subscriber.received] == statuses  # each once, in order
    assert subscriber.most_open == 1
    assert subscriber.connections >= 2  # both workers delivered: the association was handed over
    assert len(holders) == 1 and None not in holders  # the last one's association is still kept


def _report(n: int) -> Any:
    from broker.dicom_json import element, tag_of
    from broker.outbox.runner import Event

    info = {tag_of("SCPStatus"): element("SCPStatus", "RESTARTED")}
    return Event(n, f"event-{n}", "ups.event", {"subscriber": "SUBSCRIBER", "uid": view.GLOBAL_SUBSCRIPTION,
                                                  "event_type": 4, "info": info}, "ups-subscriber:SUBSCRIBER", 0)


def test_a_dead_holders_association_lease_is_taken_after_it_expires_and_a_live_one_that_keeps_it_fails_the_event(
        engine: Engine, subscriber: Counting) -> None:
    from broker.cluster.handoff import HandOffLeases
    from broker.config import Peer
    from broker.outbound.dicom_peers import PeerFailure
    from broker.outbound.ups_events import AssociationPool, deliver

    peer, name = Peer("SUBSCRIBER", "127.0.0.1", subscriber.port), association_lease("SUBSCRIBER")
    pool = AssociationPool(leases=HandOffLeases(engine, "pool-a", 4.0), handoff_wait=3.0)
    try:
        assert leases.try_acquire(engine, name, "dead-worker", 1.0)  # it dies now, its lease runs out
        started = time.monotonic()
        assert deliver("BROKER", peer, _report(1), engine, timeout=10, pool=pool) == 1
        assert 0.8 < time.monotonic() - started < 3.0
        assert leases.holder_of(engine, name) == "pool-a"  # kept with the idle association
        pool.close()
        assert leases.holder_of(engine, name) is None  # closed: let go

        stop = threading.Event()

        def stubborn() -> None:  # a holder that keeps renewing and never looks at requests
            while not stop.is_set():
                leases.try_acquire(engine, name, "stubborn", 2.0)
                stop.wait(0.2)

        thread = threading.Thread(target=stubborn)
        thread.start()
        try:
            wait_until(lambda: leases.holder_of(engine, name) == "stubborn", what="the stubborn holder")
            with pytest.raises(PeerFailure, match="another process of the cluster"):
                deliver("BROKER", peer, _report(2), engine, timeout=10, pool=pool)
        finally:
            stop.set()
            thread.join()
    finally:
        pool.close()
    assert [str(r.info.SCPStatus) for r in subscriber.received] == ["RESTARTED"]
    assert subscriber.most_open == 1
