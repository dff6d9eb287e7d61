"""Faults on the durable event path, with a real Redis (a dedicated ``redis-server`` started here, not the
shared one on 6379) and a real Celery worker process (``broker worker``); the relay runs in the test
process (``EventPath``, as in ``broker run``) and the events come from the domain: orders placed through
the HL7 intake, MPPS N-CREATE / N-SET and IAN through the workflow services.

What "once" means here. A ``ris.status`` event is delivered to the RIS at least once; MSH-10 is derived
from the event id, so every delivery of one event carries the same control ID. The RIS sees a control ID
twice only when a send of it was not recorded as done: the worker died (or its ACK wait timed out)
after the RIS got the message and before the outbox row was marked done. So:

- Redis down (nothing dies, every ACK arrives): every control ID exactly once, every row done after
  exactly one attempt; the relay's re-publishing of tasks Redis lost is absorbed by the claim.
- Worker killed with SIGKILL while the RIS holds back its ACK: the RIS sees that one control ID twice
  (the send whose ACK was lost, and the new worker's), every other control ID once, in order per order;
  the state effects (procedure transitions, MPPS state, outbox row done) exist once; the row shows
  2 attempts. The RIS recognises the repeat by its control ID (HL7 v2 duplicate detection).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from pydicom.uid import generate_uid
from sqlalchemy import Engine

from broker.config import load_settings
from broker.events.wiring import EventPath
from broker.hl7.message import parse
from broker.hl7.mllp import FrameDecoder, encode_frame
from broker.mapping.rules import MappingSet
from broker.outbound.ris_hl7 import control_id
from broker.store import migrate
from broker.store.session import make_engine
from broker.store.tables import MppsInstance, ProcedureTransition
from tests.conftest import ROOT, _postgres_database
from tests.events_support import Scheduled, ThreadedListener, ian, mpps_create, mpps_final, outbox, rows, schedule
from tests.integration.test_cli import env_for, free_port, run_cli

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]


# --- a dedicated Redis ----------------------------------------------------------------------------
class RedisServer:
    """``redis-server`` on its own port, without persistence: a restart comes back empty (the queue is
    lost with it, which the relay must make good)."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def queue(redis_server: RedisServer) -> RedisServer:
    """The dedicated Redis, running and empty."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    redis_server.client().flushall()
    return redis_server


# --- a RIS that records every message, before it ACKs ---------------------------------------------
@dataclass(frozen=True)
class Received:
    control_id: str
    placer_order: str
    order_status: str
    at: float


class RecordingRis(ThreadedListener):
    """An MLLP listener on a fixed port that records every status message when it arrives (so a message
    whose ACK is lost is recorded too) and ACKs with ``ack_code``; ``hold_next`` seconds delay the ACK
    of the next message (a slow RIS); ``stop()`` / ``start()`` take it down and up on the same port."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.received: list[Received] = []
        self.ack_code = "AA"
        self.hold_next = 0.0
        self.changed = threading.Condition()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(1 << 20)
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    message = parse(frame.decode("utf-8"))
                    orc = message.first("ORC")
                    msh10 = message.value(message.msh, 10)
                    with self.changed:
                        self.received.append(Received(msh10, message.value(orc, 2, 1), message.value(orc, 5),
                                                      time.monotonic()))
                        hold, self.hold_next = self.hold_next, 0.0
                        code = self.ack_code
                        self.changed.notify_all()
                    if hold:
                        await asyncio.sleep(hold)
                    ack = f"MSH|^~\\&|RIS||WLBROKER||20261123||ACK|R{msh10}|P|2.3.1\rMSA|{code}|{msh10}\r"
                    writer.write(encode_frame(ack.encode()))
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def control_ids(self) -> list[str]:
        with self.changed:
            return [r.control_id for r in self.received]

    def wait_for(self, condition: Callable[[list[Received]], bool], timeout: float) -> list[Received]:
        with self.changed:
            assert self.changed.wait_for(lambda: condition(self.received), timeout), \
                f"the RIS did not get what was expected in {timeout} s: {self.received}"
            return list(self.received)


@pytest.fixture
def ris() -> Iterator[RecordingRis]:
    server = RecordingRis(free_port())
    yield server
    server.close()


# --- the broker side: database, relay in this process, worker processes ---------------------------
@contextmanager
def fresh_database(backend: str, tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    if backend == "sqlite":
        urls: Iterator[str] = iter([f"sqlite:///{tmp_path / 'broker.db'}"])
    else:
        urls = _postgres_database()
    url = next(urls)
    engine = make_engine(url)
    migrate.upgrade(engine)
    try:
        yield url, engine
    finally:
        engine.dispose()
        for _ in urls:  # drops the PostgreSQL database
            pass


@pytest.fixture(params=["sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    with fresh_database(request.param, tmp_path) as pair:
        yield pair


class Broker:
    """The relay (in this process, as ``broker run`` has it) and ``broker worker`` processes with the
    same settings."""

    def __init__(self, database_url: str, engine: Engine, queue: RedisServer, ris: RecordingRis, logs: Path,
                 **settings: str) -> None:
        self.engine = engine
        self.logs = logs
        self.values = {"database_url": database_url, "redis_url": queue.url,
                       "ris_hl7_address": f"127.0.0.1:{ris.port}", "event_poll_interval": "0.1",
                       "event_lease_seconds": "3", "event_backoff_base": "0.2", "event_backoff_max": "1",
                       "event_max_attempts": "100", "ris_hl7_ack_timeout": "2", "log_level": "INFO", **settings}
        self.env = env_for(database_url, **{f"BROKER_{k.upper()}": v for k, v in self.values.items()
                                            if k != "database_url"})
        self.path = EventPath.start(load_settings(**self.values), engine)
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def mpps(self) -> Any:
        return self.path.workflow.mpps

    def start_worker(self) -> subprocess.Popen[bytes]:
        """``broker worker --concurrency 1`` in its own process group (a Celery main process and its child)."""
        log = (self.logs / f"worker{len(self.workers) + 1}.log").open("wb")
        process = subprocess.Popen([sys.executable, "-m", "broker", "worker", "--concurrency", "1"], cwd=ROOT,
                                   env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.workers.append(process)
        return process

    @staticmethod
    def kill(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if process.poll() is None:
            os.killpg(process.pid, sig)  # the group of a worker this test started
        process.wait(15)

    def stop(self) -> None:
        self.path.stop()
        for process in self.workers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    self.kill(process)

    def worker_log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.logs.glob("worker*.log")))


@contextmanager
def running_broker(database: tuple[str, Engine], queue: RedisServer, ris: RecordingRis, tmp_path: Path,
                   **settings: str) -> Iterator[Broker]:
    broker = Broker(database[0], database[1], queue, ris, tmp_path, **settings)
    try:
        yield broker
    except BaseException:
        print(broker.worker_log())
        raise
    finally:
        broker.stop()


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not in {seconds} s: {what}")


def statuses(engine: Engine) -> list[Any]:
    return outbox(engine, "ris.status")


def all_done(engine: Engine, count: int) -> bool:
    found = statuses(engine)
    return len(found) == count and all(r.status == "done" for r in found)


def start_and_complete(broker: Broker, order: Scheduled) -> str:
    uid = generate_uid()
    assert broker.mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01").ok
    assert broker.mpps.update(uid, mpps_final(), "CT01").ok
    return uid


def per_order(engine: Engine) -> dict[str, list[str]]:
    """The control IDs each order's status events must reach the RIS with, in outbox (= causal) order."""
    expected: dict[str, list[str]] = {}
    for row in statuses(engine):
        expected.setdefault(row.payload["placer_order_number"], []).append(control_id(row.event_id))
    return expected


def arrivals_per_order(received: list[Received]) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for r in received:
        seen.setdefault(r.placer_order, []).append(r.control_id)
    return seen


# --- the faults -----------------------------------------------------------------------------------
@pytest.mark.timeout(150)
def test_redis_down_for_30_s_mid_burst(database: tuple[str, Engine], mappings: MappingSet, queue: RedisServer,
                                       ris: RecordingRis, tmp_path: Path) -> None:
    """50 MPPS operations (25 orders x N-CREATE + N-SET COMPLETED); Redis stops after the 10th for 30 s.
    The domain calls keep succeeding (the outbox is in the database); afterwards every status reaches
    the RIS exactly once, in order per order, and every row is done after one attempt."""
    engine = database[1]
    orders = [schedule(engine, mappings, n) for n in range(1, 26)]
    ris.start()
    with running_broker(database, queue, ris, tmp_path) as broker:
        broker.start_worker()
        for order in orders[:5]:  # 10 operations with Redis up
            start_and_complete(broker, order)
        queue.stop()
        stopped = time.monotonic()
        for order in orders[5:]:  # 40 operations with Redis down: each must still succeed at once
            started = time.monotonic()
            start_and_complete(broker, order)
            assert time.monotonic() - started < 2, "an MPPS operation waited for Redis"
        assert time.monotonic() - stopped < 25
        during = len(ris.control_ids())
        time.sleep(max(0.0, 30 - (time.monotonic() - stopped)))
        assert len(ris.control_ids()) == during, "delivered while Redis was down"
        pending = [r for r in statuses(engine) if r.status != "done"]
        assert len(pending) >= 40  # at least the ones queued during the outage wait in the database
        queue.start()
        wait_until(lambda: all_done(engine, 50), 60, "every status event done after Redis returned")
        received = ris.wait_for(lambda got: len(got) >= 50, 10)
        time.sleep(1.0)  # anything sent twice would arrive now
        received = ris.wait_for(lambda got: True, 1)
    rows_ = statuses(engine)
    assert [r.attempts for r in rows_] == [1] * 50
    ids = [r.control_id for r in received]
    assert len(ids) == 50 and len(set(ids)) == 50, "a status message was delivered twice"
    assert arrivals_per_order(received) == per_order(engine)
    assert all(len(seq) == 2 for seq in per_order(engine).values())
    assert [r.order_status for r in received if r.placer_order == "PO-77001"] == ["IP", "CM"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_worker_killed_mid_task(database: tuple[str, Engine], mappings: MappingSet, queue: RedisServer,
                                ris: RecordingRis, tmp_path: Path) -> None:
    """The RIS holds back the ACK of the IP message; the whole worker (main process and child) is killed
    with SIGKILL while it waits. After the lease (3 s) the relay publishes the event again and a new
    worker process sends it (same control ID) and then the CM queued behind it."""
    engine = database[1]
    order = schedule(engine, mappings)
    other = schedule(engine, mappings, 2)
    ris.start()
    with running_broker(database, queue, ris, tmp_path) as broker:
        first = broker.start_worker()
        ris.hold_next = 60
        uid = generate_uid()
        assert broker.mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01").ok
        ris.wait_for(lambda got: len(got) == 1, 30)
        [running] = statuses(engine)
        assert (running.status, running.attempts) == ("running", 1)
        broker.kill(first)
        assert broker.mpps.update(uid, mpps_final(), "CT01").ok  # queued behind the IP of its order
        start_and_complete(broker, other)
        broker.start_worker()
        wait_until(lambda: all_done(engine, 4), 40, "every status event done after the takeover")
        time.sleep(1.0)
        received = ris.wait_for(lambda got: True, 1)
    [ip, cm, other_ip, other_cm] = statuses(engine)
    assert [(r.status, r.attempts) for r in (ip, cm, other_ip, other_cm)] == [("done", 2), ("done", 1),
                                                                              ("done", 1), ("done", 1)]
    ids = [r.control_id for r in received]
    assert ids.count(control_id(ip.event_id)) == 2  # the send whose ACK was lost, and the new worker's
    assert sorted(ids.count(control_id(r.event_id)) for r in (cm, other_ip, other_cm)) == [1, 1, 1]
    mine = [(r.control_id, r.order_status) for r in received if r.placer_order == "PO-77001"]
    assert mine == [(control_id(ip.event_id), "IP"), (control_id(ip.event_id), "IP"),
                    (control_id(cm.event_id), "CM")]
    # the state effects, once
    transitions = rows(engine, ProcedureTransition, procedure_fk=order.procedure_pk)
    assert [(t.from_state, t.to_state) for t in transitions] == [("SCHEDULED", "STARTED"), ("STARTED", "COMPLETED")]
    [mpps] = rows(engine, MppsInstance, sop_instance_uid=uid)
    assert mpps.status == "COMPLETED"


@pytest.mark.timeout(60)
def test_ris_down_retried_with_backoff_and_delivered_in_order(database: tuple[str, Engine], mappings: MappingSet,
                                                              queue: RedisServer, ris: RecordingRis,
                                                              tmp_path: Path) -> None:
    """No RIS listening: the head of the order's statuses (MPPS IN PROGRESS -> IP, COMPLETED -> CM, IAN ->
    IMAGES AVAILABLE -> CM) is retried with growing delays while the later ones wait their turn; once
    the RIS is up all three arrive, once each, in the order they happened."""
    engine = database[1]
    order = schedule(engine, mappings)
    with running_broker(database, queue, ris, tmp_path,
                        ris_status_transitions="STARTED,COMPLETED,DISCONTINUED,IMAGES AVAILABLE") as broker:
        broker.start_worker()
        uid = start_and_complete(broker, order)
        assert broker.path.workflow.ian.create(generate_uid(), ian(order.study_instance_uid, uid, [generate_uid()]),
                                               "ARCHIVE").ok
        assert len(statuses(engine)) == 3
        wait_until(lambda: statuses(engine)[0].attempts >= 2, 30, "the first status retried")
        began = time.monotonic()
        head = statuses(engine)[0]
        time.sleep(3.0)
        head_after, *later = statuses(engine)
        # backoff 0.2, 0.4, 0.8, 1, 1 ... s: at most 4 more attempts fit into 3 s (plus one of slack)
        assert head_after.attempts - head.attempts <= 5, (head.attempts, head_after.attempts)
        assert head_after.status == "pending" and "connect" in head_after.last_error
        assert [(r.status, r.attempts) for r in later] == [("pending", 0), ("pending", 0)]  # not sent out of order
        assert ris.received == []
        ris.start()
        wait_until(lambda: all_done(engine, 3), 20, "delivered once the RIS is up")
        assert time.monotonic() - began < 20
        time.sleep(0.5)
        received = ris.wait_for(lambda got: True, 1)
    ids = [control_id(r.event_id) for r in statuses(engine)]
    assert [r.control_id for r in received] == ids
    assert [r.order_status for r in received] == ["IP", "CM", "CM"]
    assert [r.attempts for r in statuses(engine)][1:] == [1, 1]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_failed_event_listed_and_retried_by_the_cli(database: tuple[str, Engine], mappings: MappingSet,
                                                    queue: RedisServer, ris: RecordingRis, tmp_path: Path) -> None:
    """The RIS rejects (AE) until the event has used its 2 attempts: failed, shown by ``broker events
    failed``, and its order's next status waits behind it; ``broker events retry ID`` brings it back,
    and both reach the RIS in order."""
    url, engine = database
    order = schedule(engine, mappings)
    ris.ack_code = "AE"
    ris.start()
    with running_broker(database, queue, ris, tmp_path, event_max_attempts="2") as broker:
        broker.start_worker()
        uid = generate_uid()
        assert broker.mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01").ok
        wait_until(lambda: statuses(engine)[0].status == "failed", 30, "the status event failed")
        assert broker.mpps.update(uid, mpps_final(), "CT01").ok
        time.sleep(1.0)
        failed, waiting = statuses(engine)
        assert (failed.status, failed.attempts) == ("failed", 2) and "AE" in failed.last_error
        assert (waiting.status, waiting.attempts) == ("pending", 0)  # an order's statuses keep their order

        env = env_for(url)
        listing = run_cli("events", "failed", env=env)
        assert listing.returncode == 0, listing.stderr
        [line] = [x for x in listing.stdout.splitlines() if x.split()[0] == str(failed.id)]
        assert "ris.status" in line and "RisRefused" in line and line.split()[2] == "2"
        ris.ack_code = "AA"
        retried = run_cli("events", "retry", str(failed.id), env=env)
        assert retried.returncode == 0, retried.stderr
        wait_until(lambda: all_done(engine, 2), 20, "the retried event and the one behind it delivered")
        assert run_cli("events", "failed", env=env).stdout.strip() == "no failed events"
        received = ris.wait_for(lambda got: True, 1)
    ip = control_id(failed.event_id)
    assert [(r.control_id, r.order_status) for r in received] == [(ip, "IP"), (ip, "IP"), (ip, "IP"),
                                                                  (control_id(waiting.event_id), "CM")]
    assert [(r.status, r.attempts) for r in statuses(engine)] == [("done", 1), ("done", 1)]
