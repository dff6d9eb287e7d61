"""The relay: publishes due outbox rows to the task queue, and the in-process worker.

It runs as a thread of ``broker run``. A row is due when it is pending and its next attempt time
has come (and the relay did not publish it within the last lease period), or when it is running
with an expired lease (its worker died). Only the head of each ordering key is published: a later
event of the same order waits in the database, not in the queue. After publishing, the row's
``lease_until`` is set so the same row is not published every poll; should the task be lost (a
Redis flushed, a queue purged) it is published again once that lease has passed.

The relay is woken by the services after a commit that queued events (``wake``), so a status
message does not wait for the poll; it also polls every ``event_poll_interval`` seconds. Every node of
a cluster runs a relay: the conditional update that marks a row before publishing lets one relay
publish it per lease period, whichever node it is on. What must run on one node at a time (the Storage
Commitment timeout sweep, :meth:`Relay.vacuum`) is a job of :class:`broker.cluster.periodic.PeriodicJobs`.

Publishing: with ``BROKER_REDIS_URL`` set, to Celery on Redis (``workers.tasks.run_event``); with it
empty, to a thread pool in this process that runs the same :class:`EventRunner`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Engine, and_, or_, select, update

from broker.events.queue import RUN_EVENTS, celery_for
from broker.outbox.outbox import CONSUMED_KINDS, OUTBOX
from broker.outbox.runner import EventRunner, key_heads

log = structlog.get_logger(__name__)

# Hands a batch of event ids to the workers (one task per batch with Celery).
Publish = Callable[[list[str]], None]
# At most this many events per published task: one task per event cost the relay and the worker about
# 1 ms of Celery and Redis each, and a task's events share their claim and done transactions (UPS event
# reports to many subscribers also go out side by side); a burst is still spread over several tasks, so
# over the worker's pool.
TASK_BATCH_MAX = 25
TASKS_PER_BURST = 4
# After a poll that published events the relay waits this long before it looks again, even when woken:
# under a steady stream of commits (UPS changes) it otherwise published the one or two heads freed
# since the last commit as a task each, and 100 subscribers' backlogs queued as tasks of one
# subscriber each (measured: 1.4 events per task, 170 tasks waiting in Redis, p99 25 s). Waiting
# lets a poll gather the heads freed meanwhile into tasks the workers deliver side by side.
PUBLISH_GAP = 0.1


def task_batches(event_ids: list[str]) -> list[list[str]]:
    """``event_ids`` cut into about :data:`TASKS_PER_BURST` tasks of at most :data:`TASK_BATCH_MAX` ids."""
    size = min(TASK_BATCH_MAX, max(1, -(-len(event_ids) // TASKS_PER_BURST)))
    return [event_ids[i:i + size] for i in range(0, len(event_ids), size)]


def _due(now: datetime) -> Any:
    """SQL condition: the row may be published now. Rows of the consumed kinds (a WebSocket subscriber's
    UPS event reports) never are: they wait for their key's channel (:mod:`broker.outbox.consumer`)."""
    return and_(or_(and_(OUTBOX.c.status == "pending", OUTBOX.c.next_attempt_at <= now,
                         or_(OUTBOX.c.lease_until.is_(None), OUTBOX.c.lease_until < now)),
                    and_(OUTBOX.c.status == "running", OUTBOX.c.lease_until < now)),
                OUTBOX.c.kind.not_in(sorted(CONSUMED_KINDS)))


class Relay:
    """Publishes due events; :meth:`start` runs it in a daemon thread until :meth:`stop`."""

    def __init__(self, engine: Engine, publish: Publish, *, poll_interval: float = 0.5, lease_seconds: float = 60.0,
                 batch: int = 200, clock: Callable[[], datetime] = datetime.now) -> None:
        self.engine = engine
        self.publish = publish
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.batch = batch
        self.clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """Look for due events now (called after a commit that added some)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="outbox-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                published = self.run_once()
            except Exception:
                log.exception("relay.failed")
                published = 0
            if published:
                self._stop.wait(PUBLISH_GAP)
            if published < self.batch:  # a full batch: more may be due at once
                self._wake.wait(self.poll_interval)

    def vacuum(self) -> None:
        """``VACUUM ANALYZE outbox`` (PostgreSQL; the periodic job ``outbox-vacuum``): the outbox is a
        queue, each row inserted, updated two or three times and deleted or marked done within seconds.
        Between autovacuum's runs (a minute apart at best) its dead rows and stale statistics made the
        due-event search walk tens of thousands of dead index entries (50-140 ms a poll at 800 UPS event
        reports/s, measured); a vacuum of the small live table takes well under 0.1 s."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            db.exec_driver_sql("VACUUM ANALYZE outbox")

    def run_once(self) -> int:
        """Publish the due events; returns how many were published."""
        now = self.clock()
        with self.engine.connect() as db:
            ids = list(db.execute(select(OUTBOX.c.id).where(_due(now), key_heads())
                                  .order_by(OUTBOX.c.id).limit(self.batch)).scalars())
        if not ids:
            return 0
        # Marked before publishing, in its own short transaction: a worker that takes the task at once
        # must not find the row locked by the relay (PostgreSQL SKIP LOCKED would skip it). The condition
        # is checked again row by row, so a row a worker ran meanwhile (running, done, or pending with a
        # later attempt time) is left alone.
        # With several nodes (a relay each) the rows another relay is marking right now are skipped, not
        # waited for: a relay that waited on that row lock found the row no longer due once it was
        # released, but PostgreSQL keeps the lock it took for that re-check until the end of the
        # statement's transaction, and the other relay's worker, claiming the row just then with SKIP
        # LOCKED, skipped it: the event waited a whole lease (60 s) to be published again (seen with two
        # event paths on one database).
        rows: Any = OUTBOX.c.id.in_(ids)
        if self.engine.dialect.name == "postgresql":
            rows = OUTBOX.c.id.in_(select(OUTBOX.c.id).where(OUTBOX.c.id.in_(ids), _due(now))
                                   .with_for_update(skip_locked=True))
        until = self.clock() + timedelta(seconds=self.lease_seconds)
        with self.engine.begin() as db:
            marked = sorted((row.id, row.event_id) for row in db.execute(
                update(OUTBOX).where(rows, _due(now))
                .values(status="pending", lease_until=until).returning(OUTBOX.c.id, OUTBOX.c.event_id)))
        published = 0
        for batch in task_batches([event_id for _, event_id in marked]):
            try:
                self.publish(batch)
            except Exception as exc:  # the queue is down: unmark the rest, try again at the next poll
                log.warning("relay.publish_failed", event_ids=batch, error=f"{type(exc).__name__}: {exc}")
                unpublished = [pk for pk, _ in marked[published:]]
                with self.engine.begin() as db:
                    db.execute(update(OUTBOX).where(OUTBOX.c.id.in_(unpublished), OUTBOX.c.status == "pending",
                                                    OUTBOX.c.lease_until == until).values(lease_until=None))
                break
            published += len(batch)
        return published


class InProcessWorker:
    """The embedded queue (no Redis): a thread pool in the broker that runs :class:`EventRunner`."""

    def __init__(self, runner: EventRunner, threads: int = 4) -> None:
        self.runner = runner
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="event-worker")

    def publish(self, event_ids: list[str]) -> None:
        self.pool.submit(self._run, event_ids)

    def _run(self, event_ids: list[str]) -> None:
        try:
            self.runner.run_many(event_ids)
        except Exception:
            log.exception("event.runner_failed", event_ids=event_ids)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def celery_publisher(redis_url: str) -> Publish:
    """Publishing to Celery on Redis: ``workers.tasks.run_events(event_ids)``, failing fast when Redis is down."""
    app = celery_for(redis_url)

    def publish(event_ids: list[str]) -> None:
        app.send_task(RUN_EVENTS, args=[event_ids], retry=False)

    return publish
