"""Building the event path of a process from the settings: the runner, the relay, the embedded worker.

``broker run`` starts an :class:`EventPath` (relay thread; with no Redis also the in-process worker;
the periodic jobs of the event path, run on one node of the cluster at a time); a Celery worker process
builds only a runner (workers.tasks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog
from sqlalchemy import Engine

from broker.cluster.nodes import node_id_for
from broker.cluster.periodic import PeriodicJobs
from broker.config import Settings
from broker.dicom.workflow import Workflow, build_workflow
from broker.events.handlers import build_batch_handlers, build_handlers
from broker.events.relay import InProcessWorker, Relay, celery_publisher
from broker.outbox.runner import EventRunner, RetryPolicy
from broker.stgcmt.service import CommitmentService
from broker.workflow.context import WorkflowConfig

log = structlog.get_logger(__name__)


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(settings.event_max_attempts, settings.event_backoff_base, settings.event_backoff_max,
                       settings.event_lease_seconds)


def build_runner(settings: Settings, engine: Engine, commitment: CommitmentService | None = None) -> EventRunner:
    """The runner of this process with the handlers the settings configure."""
    return EventRunner(engine, build_handlers(settings, engine, commitment=commitment), retry_policy(settings),
                       batch_handlers=build_batch_handlers(settings, engine))


def sweep_interval(settings: Settings) -> float:
    """Seconds between two Storage Commitment timeout sweeps: every 30 s, more often for a shorter
    ``stgcmt_timeout``, so an unanswered request is failed at most about one timeout late."""
    return max(0.2, min(30.0, settings.stgcmt_timeout))


@dataclass
class EventPath:
    """The relay and (embedded queue) the in-process worker of ``broker run``, plus the workflow
    services the DICOM edge calls; their commits wake the relay. ``jobs``: this node's periodic jobs
    (the Storage Commitment timeout sweep, the outbox VACUUM on PostgreSQL; ``broker run`` adds more),
    each run on one node of the cluster at a time."""

    relay: Relay
    worker: InProcessWorker | None
    workflow: Workflow
    jobs: PeriodicJobs

    @classmethod
    def start(cls, settings: Settings, engine: Engine) -> EventPath:
        """Start the relay thread (and the worker threads when ``BROKER_REDIS_URL`` is empty)."""
        worker: InProcessWorker | None = None
        wakers: list[Callable[[], None]] = []  # the relay's wake, once it exists

        def wake() -> None:
            for waker in wakers:
                waker()

        # Results recorded here (a report on the request's association, the timeout sweep) may queue
        # RIS status events: they wake the relay like the DICOM edge's commits do.
        commitment = CommitmentService(engine, WorkflowConfig.from_settings(settings), wake)
        if settings.redis_url:
            publish = celery_publisher(settings.redis_url)
        else:
            worker = InProcessWorker(build_runner(settings, engine, commitment))
            publish = worker.publish
        relay = Relay(engine, publish, poll_interval=settings.event_poll_interval,
                      lease_seconds=settings.event_lease_seconds)
        wakers.append(relay.wake)
        if worker is not None:
            worker.runner.on_done = relay.wake  # a done event may unblock the next of its key
        relay.start()
        jobs = PeriodicJobs(engine, node_id_for(settings), settings.cluster_lease_seconds)
        jobs.add("stgcmt-timeouts", sweep_interval(settings), commitment.sweep_timeouts)
        # VACUUM is PostgreSQL's; SQLite reuses the pages of deleted rows by itself
        if settings.outbox_vacuum_interval and engine.dialect.name == "postgresql":
            jobs.add("outbox-vacuum", settings.outbox_vacuum_interval, relay.vacuum)
        jobs.start()
        log.info("events.started", queue="redis" if settings.redis_url else "embedded",
                 stgcmt_sweep_every=sweep_interval(settings))
        return cls(relay, worker, build_workflow(settings, engine, relay.wake), jobs)

    def wake(self) -> None:
        self.relay.wake()

    def stop(self) -> None:
        self.jobs.stop()
        self.relay.stop()
        if self.worker is not None:
            self.worker.shutdown()
