"""Named leases (broker.cluster.leases) on SQLite and PostgreSQL: one holder at a time, renewal, release,
takeover after expiry, and exactly one winner among many threads and among several processes."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
from sqlalchemy import Engine

from broker.cluster import leases
from broker.store.session import make_engine

pytestmark = pytest.mark.integration


def test_a_lease_is_held_by_one_holder_until_released(engine: Engine) -> None:
    assert leases.try_acquire(engine, "job:sweep", "node-a", 30)
    assert leases.holder_of(engine, "job:sweep") == "node-a"
    assert not leases.try_acquire(engine, "job:sweep", "node-b", 30)
    assert leases.try_acquire(engine, "job:sweep", "node-a", 30)  # renewed by its holder
    assert leases.try_acquire(engine, "job:other", "node-b", 30)  # another name is another lease
    assert not leases.release(engine, "job:sweep", "node-b")  # not b's to give up
    assert leases.release(engine, "job:sweep", "node-a")
    assert leases.holder_of(engine, "job:sweep") is None
    assert leases.try_acquire(engine, "job:sweep", "node-b", 30)


def test_an_expired_lease_is_taken_over_and_its_old_holder_cannot_renew_it(engine: Engine) -> None:
    assert leases.try_acquire(engine, "audit-shipper", "dead-node", 0.3)
    assert not leases.try_acquire(engine, "audit-shipper", "node-b", 30)
    time.sleep(0.5)
    assert leases.holder_of(engine, "audit-shipper") is None  # expired: nobody holds it
    assert leases.try_acquire(engine, "audit-shipper", "node-b", 30)
    assert not leases.try_acquire(engine, "audit-shipper", "dead-node", 30)  # back from its pause: too late
    assert leases.renew_all(engine, "dead-node", ["audit-shipper"], 30) == set()
    assert leases.renew_all(engine, "node-b", ["audit-shipper"], 30) == {"audit-shipper"}


def test_a_renewal_keeps_the_request_to_let_go_and_a_takeover_clears_it(engine: Engine) -> None:
    assert leases.try_acquire(engine, "ups-association:SUB", "pool-a", 30)
    leases.want(engine, "ups-association:SUB", "pool-b")
    assert leases.wanted_of(engine, "pool-a") == {"ups-association:SUB"}
    assert leases.try_acquire(engine, "ups-association:SUB", "pool-a", 30)
    assert leases.wanted_of(engine, "pool-a") == {"ups-association:SUB"}
    assert leases.release(engine, "ups-association:SUB", "pool-a")
    assert leases.try_acquire(engine, "ups-association:SUB", "pool-b", 30)
    assert leases.wanted_of(engine, "pool-b") == set()


def test_many_threads_asking_at_once_make_exactly_one_holder(engine: Engine) -> None:
    winners: list[str] = []
    start = threading.Barrier(8)

    def contend(holder: str) -> None:
        start.wait()
        for _ in range(5):
            if leases.try_acquire(engine, "contended", holder, 30):
                winners.append(holder)

    threads = [threading.Thread(target=contend, args=(f"thread-{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(set(winners)) == 1
    assert leases.holder_of(engine, "contended") == winners[0]


def _contend(database_url: str, holder: str, rounds: int, start: float, results: multiprocessing.Queue) -> None:
    engine = make_engine(database_url, pool_size=1)
    time.sleep(max(0.0, start - time.time()))
    won = [n for n in range(rounds) if leases.try_acquire(engine, f"round-{n}", holder, 30)]
    results.put((holder, won))
    engine.dispose()


def test_processes_asking_at_once_make_exactly_one_holder_per_lease(engine: Engine, database_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()
    rounds, start = 30, time.time() + 3
    processes = [context.Process(target=_contend, args=(database_url, f"process-{n}", rounds, start, results))
                 for n in range(3)]
    for process in processes:
        process.start()
    won = dict(results.get(timeout=40) for _ in processes)
    for process in processes:
        process.join(10)
    holders = {n: [holder for holder, rounds_won in won.items() if n in rounds_won] for n in range(rounds)}
    assert all(len(names) == 1 for names in holders.values()), holders
    assert all(leases.holder_of(engine, f"round-{n}") == holders[n][0] for n in range(rounds))
