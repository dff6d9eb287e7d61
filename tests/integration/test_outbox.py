"""The durable event path on SQLite and PostgreSQL: outbox rows commit with their change, tasks run
once per event id, in order per ordering key, with backoff, ending failed and retryable."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine
from sqlalchemy import event as sqlalchemy_event

from broker.events.relay import InProcessWorker, Relay
from broker.outbox import outbox as events
from broker.outbox.runner import Event, EventRunner, RetryPolicy
from tests.events_support import outbox
from tests.integration.test_cli import env_for, run_cli

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now()

    def __call__(self) -> datetime:
        return self.now


def add(engine: Engine, key: str = "", kind: str = "test") -> str:
    with engine.begin() as db:
        return events.add_event(db, kind, {"n": 1}, key, datetime.now())


def test_rolled_back_transaction_leaves_no_outbox_row(engine: Engine) -> None:
    with pytest.raises(RuntimeError), engine.begin() as db:
        events.add_event(db, "test", {}, "", datetime.now())
        raise RuntimeError("the change failed")
    assert outbox(engine) == []
    add(engine)
    assert [r.status for r in outbox(engine)] == ["pending"]


def test_the_same_event_is_processed_once(engine: Engine) -> None:
    calls: list[str] = []

    def slow(event: Event) -> None:
        calls.append(event.event_id)
        time.sleep(0.3)

    runner = EventRunner(engine, {"test": slow})
    event_id = add(engine)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(runner.run(event_id))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runner.run(event_id) == "already_done"
    assert calls == [event_id]
    assert results.count("done") == 1
    [row] = outbox(engine)
    assert (row.status, row.done_at is not None) == ("done", True)


def test_ordering_key_runs_events_in_order(engine: Engine) -> None:
    seen: list[str] = []
    runner = EventRunner(engine, {"test": lambda e: seen.append(e.event_id)})
    first, second, other = add(engine, "order:1"), add(engine, "order:1"), add(engine, "order:2")
    assert runner.run(second) == "blocked"
    assert runner.run(other) == "done"
    assert seen == [other]
    assert runner.run(first) == "done"  # and runs the next of its key at once
    assert seen == [other, first, second]


def test_a_batch_shares_its_claim_and_done_transactions_and_keeps_each_keys_order(engine: Engine) -> None:
    """A task's events are claimed in one transaction and marked done in one (per event that was most of
    the worker's cost for cheap handlers); a later event of a key in the same batch waits for the earlier
    one and runs after it in the next round."""
    seen: list[str] = []
    runner = EventRunner(engine, {"test": lambda e: seen.append(e.event_id)})
    first, other, second, third = add(engine, "order:1"), add(engine, "order:2"), add(engine, "order:1"), add(engine)
    commits: list[int] = []

    def count(connection: object) -> None:
        commits.append(1)

    sqlalchemy_event.listen(engine, "commit", count)
    try:
        results = runner.run_many([second, third, first, other, first])
    finally:
        sqlalchemy_event.remove(engine, "commit", count)
    assert results == ["blocked", "done", "done", "done", "done"]
    assert seen == [first, other, third, second]  # id order in a round; second in the round after first's
    # round 1: claim + done; round 2 (second, chained): claim + done
    assert len(commits) == 4
    assert {row.status for row in outbox(engine)} == {"done"}


def test_a_batch_handler_retries_only_the_events_it_did_not_perform(engine: Engine) -> None:
    """The UPS event reports of a task go to their subscribers side by side through one batch handler;
    a subscriber that is down makes its own event retry, not the others'."""
    batches: list[list[str]] = []

    def deliver(batch: list[Event]) -> dict[int, Exception]:
        batches.append([event.event_id for event in batch])
        return {event.id: ConnectionRefusedError("down") for event in batch if event.ordering_key == "sub:down"}

    runner = EventRunner(engine, {}, batch_handlers={"report": deliver})
    up, down = add(engine, "sub:up", kind="report"), add(engine, "sub:down", kind="report")
    assert runner.run_many([up, down]) == ["done", "retry"]
    assert batches == [[up, down]]
    rows = {row.event_id: row for row in outbox(engine)}
    assert (rows[up].status, rows[down].status, rows[down].attempts) == ("done", "pending", 1)
    assert "ConnectionRefusedError: down" in rows[down].last_error


def test_failure_backoff_failed_and_retry(engine: Engine, database_url: str) -> None:
    clock = Clock()
    broken = True

    def handler(event: Event) -> None:
        if broken:
            raise ConnectionError("RIS down")

    runner = EventRunner(engine, {"test": handler}, RetryPolicy(max_attempts=3, backoff_base=10, backoff_max=15),
                         clock=clock)
    event_id = add(engine)
    clock.now += timedelta(seconds=1)
    assert runner.run(event_id) == "retry"
    [row] = outbox(engine)
    assert (row.status, row.attempts, row.next_attempt_at) == ("pending", 1, clock.now + timedelta(seconds=10))
    assert runner.run(event_id) == "not_due"
    clock.now += timedelta(seconds=10)
    assert runner.run(event_id) == "retry"
    assert outbox(engine)[0].next_attempt_at == clock.now + timedelta(seconds=15)  # 20 s capped at 15
    clock.now += timedelta(seconds=15)
    assert runner.run(event_id) == "failed"
    [row] = outbox(engine)
    assert (row.status, row.attempts, row.last_error) == ("failed", 3, "ConnectionError: RIS down")
    assert runner.run(event_id) == "failed"  # stays failed until an operator retries

    env = env_for(database_url)
    listing = run_cli("events", "failed", env=env)
    assert listing.returncode == 0
    assert f"{row.id}" in listing.stdout and "test" in listing.stdout and "RIS down" in listing.stdout
    assert run_cli("events", "retry", str(row.id), env=env).returncode == 0
    assert run_cli("events", "retry", str(row.id), env=env).returncode == 1  # not failed any more
    [row] = outbox(engine)
    assert (row.status, row.attempts) == ("pending", 0)
    broken = False
    clock.now = datetime.now() + timedelta(seconds=1)
    assert runner.run(event_id) == "done"


def test_relay_and_in_process_worker_run_events_soon_after_commit(engine: Engine) -> None:
    done = threading.Event()
    seen: list[str] = []

    def handler(event: Event) -> None:
        seen.append(event.event_id)
        if len(seen) == 3:
            done.set()

    worker = InProcessWorker(EventRunner(engine, {"test": handler}), threads=2)
    relay = Relay(engine, worker.publish, poll_interval=5.0)  # a long poll: the wake-up must do it
    relay.start()
    try:
        time.sleep(0.2)
        started = time.monotonic()
        ids = [add(engine, "order:7"), add(engine, "order:7"), add(engine, "order:7")]
        relay.wake()
        worker.runner.on_done = relay.wake
        assert done.wait(4)
        assert time.monotonic() - started < 4
        assert seen == ids
    finally:
        relay.stop()
        worker.shutdown()
    assert {r.status for r in outbox(engine)} == {"done"}


def test_relay_republishes_a_lost_task_after_its_lease(engine: Engine) -> None:
    published: list[str] = []
    clock = Clock()
    relay = Relay(engine, published.extend, lease_seconds=30, clock=clock)
    event_id = add(engine)
    clock.now = datetime.now() + timedelta(seconds=1)
    assert relay.run_once() == 1
    assert relay.run_once() == 0  # published, not yet lost
    clock.now += timedelta(seconds=31)
    assert relay.run_once() == 1
    assert published == [event_id, event_id]


def test_a_running_event_whose_worker_died_is_taken_over(engine: Engine) -> None:
    clock = Clock()
    calls: list[str] = []

    def dies(event: Event) -> None:
        raise SystemExit  # not an Exception: the "worker" dies mid-task and never records anything

    event_id = add(engine)
    clock.now = datetime.now() + timedelta(seconds=1)
    with pytest.raises(SystemExit):
        EventRunner(engine, {"test": dies}, RetryPolicy(lease_seconds=60), clock=clock).run(event_id)
    survivor = EventRunner(engine, {"test": lambda e: calls.append(e.event_id)}, clock=clock)
    assert survivor.run(event_id) == "busy"  # redelivered at once: the lease still holds
    clock.now += timedelta(seconds=61)
    assert survivor.run(event_id) == "done"
    assert calls == [event_id]


def test_relay_publishes_a_burst_as_a_few_tasks_in_order(engine: Engine) -> None:
    """A burst of due events goes out as a few tasks of several ids (one Celery task per event cost the
    relay and the worker ~1 ms each), every event exactly once and in the order it was added."""
    tasks: list[list[str]] = []
    relay = Relay(engine, tasks.append)
    ids = [add(engine) for _ in range(23)]
    assert relay.run_once() == 23
    assert [event_id for task in tasks for event_id in task] == ids
    assert 2 <= len(tasks) <= 5 and max(len(task) for task in tasks) <= 10
    assert relay.run_once() == 0  # marked: not published again within the lease



def test_the_outbox_is_vacuumed_on_postgresql(engine: Engine, database_url: str) -> None:
    """On PostgreSQL ``broker run`` runs VACUUM ANALYZE on the outbox every ``outbox_vacuum_interval`` (a
    periodic job of the event path, on one node of the cluster at a time): the dead rows of a busy queue
    slowed the relay's due-event search between autovacuum runs. SQLite has no VACUUM to run for it
    (freed pages are reused)."""
    from broker.config import load_settings
    from broker.events.wiring import EventPath

    path = EventPath.start(load_settings(database_url=database_url, outbox_vacuum_interval=0.2,
                                         event_poll_interval=0.05), engine)
    try:
        if engine.dialect.name != "postgresql":
            assert "outbox-vacuum" not in path.jobs.names()
            return
        with engine.begin() as db:
            db.exec_driver_sql("SELECT pg_stat_reset_single_table_counters('outbox'::regclass)")
        deadline = time.monotonic() + 10
        vacuumed = None
        while vacuumed is None and time.monotonic() < deadline:
            time.sleep(0.1)
            with engine.connect() as db:
                vacuumed = db.exec_driver_sql("SELECT last_vacuum FROM pg_stat_user_tables "
                                              "WHERE relname = 'outbox'").scalar()
    finally:
        path.stop()
    assert vacuumed is not None
