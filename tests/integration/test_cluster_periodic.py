"""Periodic jobs on one node of two at a time (broker.cluster.periodic), and the audit shipper of one node
sending while the other's stands by, on SQLite and PostgreSQL. Two nodes are two holders on one database,
as two ``broker run`` processes are."""

from __future__ import annotations

import re
import socket
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select

from broker.audit.events import application_activity
from broker.audit.shipper import LEASE, AuditShipper
from broker.audit.trail import broker_participant, record
from broker.cluster import leases
from broker.cluster.periodic import PeriodicJobs
from broker.config import load_settings
from broker.outbox.outbox import OUTBOX
from broker.store.tables import AuditRecord, table_of
from tests.dicom_support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class Counting:
    """A job that records which node ran it, and whether two runs ever overlapped."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: list[str] = []
        self.running = 0
        self.overlapped = False

    def job(self, node: str) -> None:
        with self.lock:
            self.running += 1
            self.overlapped |= self.running > 1
            self.runs.append(node)
        time.sleep(0.02)
        with self.lock:
            self.running -= 1

    def nodes_since(self, start: int) -> set[str]:
        with self.lock:
            return set(self.runs[start:])


def test_a_job_runs_on_one_node_and_moves_when_that_node_dies(engine: Engine) -> None:
    counting = Counting()
    nodes = {name: PeriodicJobs(engine, name, lease_seconds=1.0) for name in ("node-a", "node-b")}
    for name, jobs in nodes.items():
        jobs.add("sweep", 0.05, lambda name=name: counting.job(name), first_after=0)
        jobs.start()
    try:
        wait_until(lambda: len(counting.runs) >= 10, what="ten runs")
        time.sleep(0.5)
        [first] = counting.nodes_since(0)  # every run so far on one node
        other = "node-b" if first == "node-a" else "node-a"
        assert nodes[first].holds("sweep") and not nodes[other].holds("sweep")
        nodes[first].stop(release=False)  # dies: its lease runs out by itself
        died_at = len(counting.runs)
        wait_until(lambda: counting.nodes_since(died_at) == {other}, seconds=10, what="the takeover")
        assert nodes[other].holds("sweep")
        assert leases.holder_of(engine, "job:sweep") == other
    finally:
        for jobs in nodes.values():
            jobs.stop()
    assert not counting.overlapped


def test_a_clean_stop_hands_the_job_over_at_once_and_a_slow_run_keeps_its_lease(engine: Engine) -> None:
    counting = Counting()
    slow_runs: list[str] = []

    def slow(node: str) -> None:
        slow_runs.append(node)
        time.sleep(1.5)  # longer than the lease: the scheduler renews it meanwhile

    a = PeriodicJobs(engine, "node-a", lease_seconds=0.6)
    a.add("sweep", 0.05, lambda: counting.job("node-a"), first_after=0)
    a.add("slow", 0.05, lambda: slow("node-a"), first_after=0)
    a.start()
    wait_until(lambda: a.holds("sweep") and a.holds("slow"), what="node-a's leases")
    b = PeriodicJobs(engine, "node-b", lease_seconds=0.6)
    b.add("sweep", 0.05, lambda: counting.job("node-b"), first_after=0)
    b.add("slow", 0.05, lambda: slow("node-b"), first_after=0)
    b.start()
    try:
        time.sleep(1.0)
        assert counting.nodes_since(0) == {"node-a"} and set(slow_runs) == {"node-a"}
        a.stop()  # releases: node-b runs the job at its next due time, not a lease later
        stopped_at, runs = time.monotonic(), len(counting.runs)
        wait_until(lambda: counting.nodes_since(runs) == {"node-b"}, what="node-b's first run")
        assert time.monotonic() - stopped_at < 0.5
    finally:
        a.stop()
        b.stop()
    assert not counting.overlapped


def _undelivered(engine: Engine) -> int:
    records = table_of(AuditRecord)
    with engine.connect() as db:
        return int(db.execute(select(func.count()).select_from(records)
                              .where(records.c.delivered_at.is_(None))).scalar_one())


class UdpRepository:
    """An Audit Record Repository over UDP (RFC 5426): a socket that keeps every datagram it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(65536))
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_one_audit_shipper_sends_the_other_stands_by_and_takes_over(engine: Engine, database_url: str) -> None:
    """Two nodes' shippers: only the lease holder sends (both sending would repeat records and break
    their order); when it stops, the other sends what came after."""
    repository = UdpRepository()
    settings = load_settings(database_url=database_url, audit_repository=f"udp://127.0.0.1:{repository.port}",
                             cluster_lease_seconds=1.5)
    a, b = AuditShipper(settings, engine, holder="node-a"), AuditShipper(settings, engine, holder="node-b")

    def application_start(n: int) -> None:
        with engine.begin() as db:
            record(db, application_activity(True, broker_participant(f"NODE{n}", role="application")),
                   datetime.now())

    a.start()
    try:
        wait_until(lambda: a.active, what="node-a sending")
        b.start()
        for n in range(3):
            application_start(n)
        wait_until(lambda: _undelivered(engine) == 0, what="the first records delivered")
        time.sleep(1.0)  # b asked for the lease about once a second and never got it
        assert a.active and not b.active
        assert leases.holder_of(engine, LEASE) == "node-a"
        a.stop()
        wait_until(lambda: b.active, seconds=5, what="node-b taking over")
        for n in range(3, 5):
            application_start(n)
        wait_until(lambda: _undelivered(engine) == 0, what="the later records delivered by node-b")
        wait_until(lambda: len(repository.messages) >= 5, what="five datagrams")
        time.sleep(0.3)
    finally:
        a.stop()
        b.stop()
        repository.close()
    nodes = [re.search(rb"NODE(\d)", message) for message in repository.messages]
    assert [int(found.group(1)) for found in nodes if found] == [0, 1, 2, 3, 4]  # each once, in order


def test_broker_run_registers_the_retention_jobs(engine: Engine, database_url: str, tmp_path: Path) -> None:
    """``broker run``'s jobs beside the event path's: the audit retention and the data retention, each on
    one node at a time; the data retention's first pass soon after start (here a done outbox event a
    week older than ``retention_outbox_days`` leaves)."""
    from broker.events.wiring import EventPath
    from broker.runtime import add_jobs

    with engine.begin() as db:
        db.execute(insert(OUTBOX).values(event_id="old-done", kind="ris.status", payload={}, ordering_key="k",
                                         status="done", attempts=1, next_attempt_at=datetime(2020, 1, 1),
                                         last_error="", created_at=datetime(2020, 1, 1),
                                         done_at=datetime.now() - timedelta(days=8)))
    settings = load_settings(database_url=database_url, retention_interval=0.2, retention_outbox_days=1,
                             retention_export_dir=str(tmp_path / "export"))
    path = EventPath.start(settings, engine)
    try:
        add_jobs(path, settings, engine, engine)
        assert {"stgcmt-timeouts", "audit-retention", "retention"} <= set(path.jobs.names())

        def gone() -> bool:
            with engine.connect() as db:
                return db.execute(select(OUTBOX.c.id).where(OUTBOX.c.event_id == "old-done")).first() is None

        wait_until(gone, what="the data retention's pass")
        assert path.jobs.holds("retention") and path.jobs.holds("audit-retention")
    finally:
        path.stop()
