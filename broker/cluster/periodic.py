"""Jobs that run every N seconds on one node of the cluster at a time (a thread of ``broker run``).

Each job has a lease ``job:<name>`` in ``cluster_leases``. When a job is due on this node's schedule,
the node runs it only if it holds the job's lease or can take it (free, or expired: its holder died
or let go when it stopped); the other nodes skip that run. The scheduler renews the leases it holds
every third of ``lease_seconds``, also while a job is running (each run has a thread of its own), so a
run longer than the lease does not let a second node start the same job. A node that dies holds its
leases until they expire; the next node whose schedule comes due then takes the job over, at most
``lease_seconds`` plus one interval later. A clean stop releases them at once.

Registered by ``broker run`` (:mod:`broker.events.wiring`, :mod:`broker.runtime`): the Storage Commitment
timeout sweep, the outbox VACUUM (PostgreSQL), the audit retention pass, and (when the package is
there) the data retention of :mod:`broker.retention`. A job must be harmless to run twice (a lease does
not fence a holder stalled past its expiry: see :mod:`broker.cluster.leases`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from sqlalchemy import Engine

from broker.cluster import leases

log = structlog.get_logger(__name__)


@dataclass
class Job:
    name: str
    interval: float
    run: Callable[[], object]
    next_run: float
    running: threading.Thread | None = None
    runs: int = 0
    failures: int = field(default=0)

    @property
    def lease(self) -> str:
        return f"job:{self.name}"


class PeriodicJobs:
    """The periodic jobs of this node; :meth:`add` them (before or after :meth:`start`)."""

    def __init__(self, engine: Engine, holder: str, lease_seconds: float = 30.0) -> None:
        self.engine = engine
        self.holder = holder
        self.lease_seconds = lease_seconds
        self._jobs: dict[str, Job] = {}
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, interval: float, run: Callable[[], object], *, first_after: float | None = None) -> None:
        """Run ``run`` every ``interval`` seconds on the node holding ``job:<name>``; the first time
        ``first_after`` seconds from now (default: one interval)."""
        start = time.monotonic() + (interval if first_after is None else first_after)
        with self._lock:
            self._jobs[name] = Job(name, interval, run, start)
        self._changed.set()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._jobs)

    def holds(self, name: str) -> bool:
        """Whether this node held ``job:<name>`` at its last look."""
        with self._lock:
            return f"job:{name}" in self._held

    def runs(self, name: str) -> int:
        with self._lock:
            return self._jobs[name].runs

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cluster-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0, release: bool = True) -> None:
        """Stop scheduling, wait up to ``timeout`` for runs under way, and let go of the leases
        (``release=False`` leaves them to expire, as a node that died would)."""
        self._stop.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            running = [job.running for job in self._jobs.values() if job.running is not None]
        for thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))
        if release:
            with self._lock:
                held, self._held = sorted(self._held), set()
            for name in held:
                try:
                    leases.release(self.engine, name, self.holder)
                except Exception as exc:  # the database is away: the lease expires by itself
                    log.warning("cluster.release_failed", lease=name, error=type(exc).__name__)

    def _loop(self) -> None:
        renew_every = self.lease_seconds / 3
        next_renew = time.monotonic() + renew_every
        while not self._stop.is_set():
            self._changed.clear()
            now = time.monotonic()
            if now >= next_renew:
                next_renew = now + renew_every
                self._renew()
            with self._lock:
                due = [job for job in self._jobs.values() if job.next_run <= now]
            for job in due:
                job.next_run = max(job.next_run + job.interval, now)
                if job.running is not None and job.running.is_alive():
                    continue  # the last run is still going: this one is skipped
                if self._take(job):
                    job.running = threading.Thread(target=self._run, args=(job,), name=f"job-{job.name}",
                                                   daemon=True)
                    job.running.start()
            with self._lock:
                wake_at = min([next_renew, *(job.next_run for job in self._jobs.values())])
            self._changed.wait(max(0.0, wake_at - time.monotonic()))

    def _renew(self) -> None:
        with self._lock:
            held = sorted(self._held)
        if not held:
            return
        try:
            still = leases.renew_all(self.engine, self.holder, held, self.lease_seconds)
        except Exception as exc:  # keep what we believe until the next renewal; the lease may expire
            log.warning("cluster.renew_failed", error=type(exc).__name__)
            return
        for name in set(held) - still:
            log.warning("cluster.job_lost", lease=name, holder=self.holder)
        with self._lock:
            self._held &= still

    def _take(self, job: Job) -> bool:
        with self._lock:
            if job.lease in self._held:
                return True
        try:
            mine = leases.try_acquire(self.engine, job.lease, self.holder, self.lease_seconds)
        except Exception as exc:
            log.warning("cluster.lease_failed", lease=job.lease, error=type(exc).__name__)
            return False
        if mine:
            log.info("cluster.job_taken", job=job.name, holder=self.holder)
            with self._lock:
                self._held.add(job.lease)
        return mine

    def _run(self, job: Job) -> None:
        try:
            job.run()
        except Exception:
            job.failures += 1
            log.exception("cluster.job_failed", job=job.name)
        finally:
            with self._lock:
                job.runs += 1
