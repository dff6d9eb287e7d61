"""The live side over real HTTP: ``broker web`` as a process, the SSE stream seeing an order made by
the HL7 intake and a state change, the poller itself, and ``broker run`` serving the API too."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select

from broker.domain.procedure_states import ProcedureState
from broker.domain.procedure_tracker import ProcedureTracker
from broker.domain.records import Cause
from broker.hl7.mllp_client import MLLPClient
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.web.listing import PROCEDURES
from broker.web.live import LiveFeed
from tests.conftest import ROOT, sample
from tests.events_support import schedule
from tests.integration.test_cli import BROKER, env_for, free_port, run_cli, wait_for_port
from tests.live_support import read_procedure_events

pytestmark = pytest.mark.integration
TOKEN = "board-token-0123456789"


def test_the_poller_reports_new_and_changed_procedures(engine: Engine, mappings: MappingSet) -> None:
    feed = LiveFeed(engine)
    schedule(engine, mappings)
    assert feed.poll() == []  # the first look only marks where it stands
    second = schedule(engine, mappings, 2)
    [added] = feed.poll()
    assert (added["id"], added["state"], added["accession_number"]) == (second.procedure_pk, "SCHEDULED", "ACC90002")
    assert feed.poll() == []
    with engine.begin() as db:
        ProcedureTracker().advance(db, second.procedure_pk, ProcedureState.STARTED,
                                   Cause("MPPS", event_kind="mpps", event_ref="1.2.3"))
    [moved] = feed.poll()
    assert (moved["id"], moved["state"]) == (second.procedure_pk, "STARTED")
    Intake(engine, mappings).handle(sample("orm_o01_cancel.hl7"))
    [canceled] = feed.poll()
    assert (canceled["id"], canceled["state"]) == (schedule_first_pk(engine), "CANCELED")


def schedule_first_pk(engine: Engine) -> int:
    with engine.connect() as db:
        return int(db.execute(select(func.min(PROCEDURES.c.id))).scalar_one())


def test_the_poller_sees_a_late_commit_of_a_lower_id(engine: Engine, mappings: MappingSet) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one writer at a time: ids commit in order")
    first, second = schedule(engine, mappings), schedule(engine, mappings, 2)
    feed = LiveFeed(engine)
    feed.poll()
    cause = Cause("MPPS", event_kind="mpps", event_ref="1.2.3")
    with engine.connect() as slow:
        late = slow.begin()
        ProcedureTracker().advance(slow, first.procedure_pk, ProcedureState.STARTED, cause)  # takes the lower id
        with engine.begin() as db:
            ProcedureTracker().advance(db, second.procedure_pk, ProcedureState.STARTED, cause)
        assert [p["id"] for p in feed.poll()] == [second.procedure_pk]
        late.commit()
    assert [(p["id"], p["state"]) for p in feed.poll()] == [(first.procedure_pk, "STARTED")]


@pytest.fixture
def web(database_url: str) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    port = free_port()
    env = env_for(database_url, BROKER_HTTP_PORT=str(port), BROKER_HTTP_HOST="127.0.0.1",
                  BROKER_API_TOKENS=f"{TOKEN}:write")
    assert run_cli("db", "upgrade", env=env).returncode == 0
    process = subprocess.Popen([*BROKER, "web"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, process)
        yield port, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_broker_web_streams_changes_and_stops_cleanly(web: tuple[int, subprocess.Popen[str]], database_url: str,
                                                      mappings: MappingSet) -> None:
    from broker.store.session import make_engine

    port, process = web
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/api/stream").status_code == 401
    engine = make_engine(database_url, pool_size=2)
    received: list[Any] = []
    arrived, connected = threading.Event(), threading.Event()
    with httpx.Client(timeout=httpx.Timeout(5, read=60)) as client, \
            client.stream("GET", f"{base}/api/stream", params={"token": TOKEN}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        reader = threading.Thread(target=read_procedure_events, args=(response, received, connected, arrived),
                                  daemon=True)
        reader.start()
        assert connected.wait(30)  # from here on every change is reported
        scheduled = schedule(engine, mappings)
        assert arrived.wait(30), "no event for the new order"
        assert received[-1]["accession_number"] == "ACC77001" and received[-1]["state"] == "SCHEDULED"
        arrived.clear()
        with engine.begin() as db:
            ProcedureTracker().advance(db, scheduled.procedure_pk, ProcedureState.STARTED,
                                       Cause("MPPS", event_kind="mpps", event_ref="1.2.3"))
        assert arrived.wait(30), "no event for the state change"
        assert received[-1]["state"] == "STARTED"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0  # an open stream does not keep the process alive
        reader.join(10)
    engine.dispose()


def test_broker_run_serves_the_api(database_url: str) -> None:
    hl7_port, http_port = free_port(), free_port()
    env = env_for(database_url, BROKER_HL7_PORT=str(hl7_port), BROKER_DICOM_PORT=str(free_port()),
                  BROKER_HTTP_PORT=str(http_port), BROKER_HTTP_HOST="127.0.0.1", BROKER_API_TOKENS=f"{TOKEN}:read")
    assert run_cli("db", "upgrade", env=env).returncode == 0
    process = subprocess.Popen([*BROKER, "run"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(hl7_port, process)
        wait_for_port(http_port, process)
        with MLLPClient("127.0.0.1", hl7_port) as client:
            assert b"MSA|AA" in client.send(sample("orm_o01_new.hl7"))
        page = httpx.get(f"http://127.0.0.1:{http_port}/api/procedures",
                         headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert [p["accession_number"] for p in page["items"]] == ["ACC77001"]
        metrics = httpx.get(f"http://127.0.0.1:{http_port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert 'broker_hl7_messages_total{message_type="ORM^O01",outcome="AA"} 1.0' in metrics.text
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_broker_run_keeps_working_when_the_http_port_is_taken(database_url: str) -> None:
    import socket

    hl7_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = env_for(database_url, BROKER_HL7_PORT=str(hl7_port), BROKER_DICOM_PORT=str(free_port()),
                      BROKER_HTTP_PORT=str(taken.getsockname()[1]), BROKER_HTTP_HOST="127.0.0.1")
        assert run_cli("db", "upgrade", env=env).returncode == 0
        process = subprocess.Popen([*BROKER, "run"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_port(hl7_port, process)
            with MLLPClient("127.0.0.1", hl7_port) as client:
                assert b"MSA|AA" in client.send(sample("orm_o01_new.hl7"))
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    assert '"event": "web.cannot_listen"' in stderr
