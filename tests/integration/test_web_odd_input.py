"""Odd input to the HTTP API from outside: ``broker web`` as a process on SQLite and PostgreSQL,
called with httpx.

A control character (NUL, ...) in a path or query parameter is answered 422, never 500 (PostgreSQL
refuses NUL in a text parameter); the patient filter takes ``%`` and ``_`` as the literal characters,
as the board's own filter does.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from broker.mapping.rules import MappingSet
from broker.store.session import make_engine
from tests.conftest import ROOT
from tests.events_support import schedule
from tests.integration.test_cli import BROKER, env_for, free_port, run_cli, wait_for_port

pytestmark = pytest.mark.integration
TOKEN = "odd-input-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def web(database_url: str, mappings: MappingSet) -> Iterator[str]:
    """The base URL of ``broker web`` on a database holding the sample order (patient MÜLLER^ERIKA)."""
    port = free_port()
    env = env_for(database_url, BROKER_HTTP_PORT=str(port), BROKER_HTTP_HOST="127.0.0.1",
                  BROKER_API_TOKENS=f"{TOKEN}:write")
    assert run_cli("db", "upgrade", env=env).returncode == 0
    engine = make_engine(database_url, pool_size=1)
    schedule(engine, mappings)
    engine.dispose()
    process = subprocess.Popen([*BROKER, "web"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


TEXT_QUERIES = [("/api/procedures", name) for name in ("modality", "station", "status", "patient", "accession")] + [
    ("/api/messages", name) for name in ("control_id", "sender", "message_type", "status")]


def test_a_control_character_in_a_parameter_is_422_not_500(web: str) -> None:
    with httpx.Client(base_url=web, headers=AUTH, timeout=30) as client:
        for path, name in TEXT_QUERIES:
            for value in ("A\x00B", "\x00", "A\x1bB"):
                answer = client.get(path, params={name: value})
                assert answer.status_code == 422, (path, name, value, answer.text)
                assert answer.json()["detail"][0]["loc"] == ["query", name]
        # a NUL in a parameter's name, in the stream's token, in path parameters of every kind
        assert client.get("/api/procedures", params={"pat\x00ient": "X"}).status_code == 422
        assert client.get("/api/stream", params={"token": "A\x00B"}).status_code == 422
        for raw in ("/api/procedures/1%00", "/api/procedures/1%00/worklist", "/api/steps/1%00/worklist-item",
                    "/api/messages/1%00", "/static/board%00.js", "/board%00"):
            answer = client.get(raw)
            assert answer.status_code == 422, (raw, answer.text)
            assert answer.json()["detail"][0]["loc"] == ["path"]
        assert client.post("/api/events/A%00B/retry").status_code == 422
        assert client.post("/api/messages/1%00/replay").status_code == 422
        # the broker is unharmed, and ordinary text still works
        page = client.get("/api/procedures", params={"modality": "ct", "status": "SCHEDULED"}).json()
        assert [p["accession_number"] for p in page["items"]] == ["ACC77001"]
        assert client.get("/api/messages", params={"sender": "EPICRIS"}).json()["total"] == 1


def test_the_patient_filter_takes_wildcard_characters_literally(web: str) -> None:
    def found(patient: str) -> list[str]:
        page = httpx.get(f"{web}/api/procedures", params={"patient": patient}, headers=AUTH, timeout=30).json()
        return [p["accession_number"] for p in page["items"]]

    # as the board filters: Patient ID exactly, or the start of the name, upper-cased, characters literal
    assert found("%") == [] and found("_") == [] and found("%LLER") == [] and found("M_LLER") == []
    assert found("\\") == [] and found("MÜ%") == []
    assert found("MÜL") == ["ACC77001"] and found("mül") == ["ACC77001"] and found("MRN4711") == ["ACC77001"]
    assert found("MRN47") == []  # the ID is matched whole
