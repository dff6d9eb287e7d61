"""HTTP hardening on the in-process application (real databases, Starlette's TestClient): the security
headers of every kind of response, API tokens given as SHA-256 hashes in a file, and the audit records
of REST reads (Query) and refusals (Security Alert).

The audit records are caught by :class:`Recorder`, which has the audit writer's ``submit``: here the
test reads what the middleware says (who, from where, which path and query, which patients); that the
writer stores and delivers them is the audit trail's own tests' business. HTTPS itself, with real
clients, is in ``test_web_tls.py``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from broker.audit.events import (
    NODE_AUTHENTICATION,
    QUERY,
    SECURITY_ALERT,
    USE_OF_RESTRICTED_FUNCTION,
    AuditEvent,
    Participant,
)
from broker.config import StartupError, load_settings
from broker.mapping.rules import MappingSet
from broker.web.access_audit import handshake_alert
from broker.web.app import create_app
from broker.web.auth import read_tokens_file, token_line
from broker.web.headers import CONTENT_SECURITY_POLICY
from tests.conftest import ROOT
from tests.events_support import schedule
from tests.integration.test_cli import env_for, free_port

pytestmark = pytest.mark.integration
READ = "read-token-0123456789"
HASHED_READ = "hashed-reader-token-0123456789"
HASHED_WRITE = "hashed-writer-token-0123456789"
HASHED_AUDIT = "hashed-auditor-token-0123456789"


class Recorder:
    """What the application submits to the audit writer (the writer's ``submit``)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def submit(self, event: AuditEvent) -> None:
        self.events.append(event)


def tokens_file(directory: Path) -> Path:
    path = directory / "tokens"
    path.write_text("# API tokens of the test\n\n"
                    f"{token_line(HASHED_READ, 'read', 'ward board')}\n"
                    f"{token_line(HASHED_WRITE, 'write')}\n"
                    f"   {hashlib.sha256(HASHED_AUDIT.encode()).hexdigest().upper()}   audit   security office\n")
    return path


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def client(engine: Engine, tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    import broker.web.app as web_app

    # The broker as a participant is the audit trail's (the writer is stood in for by Recorder).
    monkeypatch.setattr(web_app, "broker_participant", lambda ae_title: Participant(ae_title, "broker-host"))
    settings = load_settings(database_url=engine.url.render_as_string(hide_password=False),
                             api_tokens=f"{READ}:read", api_tokens_file=str(tokens_file(tmp_path)),
                             mappings_dir=ROOT / "mappings")
    with TestClient(create_app(settings, engine, audit=recorder)) as test_client:  # type: ignore[arg-type]
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- headers ----------------------------------------------------------------------------------------
def test_every_response_carries_the_security_headers(client: TestClient, engine: Engine,
                                                     mappings: MappingSet) -> None:
    schedule(engine, mappings)
    answers = {"api": client.get("/api/procedures", headers=bearer(READ)),
               "refused": client.get("/api/procedures"),
               "board": client.get("/board"),
               "static": client.get("/static/board.js"),
               "health": client.get("/healthz"),
               "not found": client.get("/nowhere"),
               "control character": client.get("/api/procedures?patient=%00", headers=bearer(READ)),
               "openapi": client.get("/openapi.json")}
    for name, answer in answers.items():
        headers = answer.headers
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY, name
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "'unsafe-inline'" not in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff", name
        assert headers["referrer-policy"] == "no-referrer", name
        assert "server" not in headers, name
        assert "strict-transport-security" not in headers, name  # TestClient speaks plain http
    assert answers["api"].headers["cache-control"] == "no-store"
    assert answers["refused"].headers["cache-control"] == "no-store"
    assert answers["control character"].status_code == 422
    assert answers["control character"].headers["cache-control"] == "no-store"
    assert answers["board"].headers["cache-control"] == "no-cache"  # the page holds no patient data


def test_a_server_error_carries_the_headers_too(engine: Engine) -> None:
    settings = load_settings(database_url=engine.url.render_as_string(hide_password=False),
                             mappings_dir=ROOT / "mappings")
    app = create_app(settings, engine)

    @app.get("/api/broken")
    def broken() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/api/broken")
    assert answer.status_code == 500
    assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["cache-control"] == "no-store"


def test_the_live_stream_has_no_store_and_is_not_buffered(client: TestClient) -> None:
    with client.stream("GET", f"/api/stream?token={READ}") as stream:
        assert stream.headers["cache-control"] == "no-store"
        assert stream.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        first = next(stream.iter_text())  # the opening arrives at once, the stream stays open
        assert ": connected" in first


def test_hsts_only_over_https(client: TestClient) -> None:
    assert client.get("https://testserver/healthz").headers["strict-transport-security"] == "max-age=31536000"
    assert "strict-transport-security" not in client.get("http://testserver/healthz").headers


def test_the_board_has_no_inline_script_or_style() -> None:
    """What the policy would block: inline <script>, style attributes or <style>, on* handlers,
    javascript: URLs, and resources of another origin."""
    page = (ROOT / "broker" / "web" / "static" / "index.html").read_text()
    script = (ROOT / "broker" / "web" / "static" / "board.js").read_text()
    assert "<script>" not in page and "<style" not in page and " style=" not in page
    assert not any(f" on{event}=" in page for event in ("click", "load", "submit", "change", "input"))
    assert "javascript:" not in page + script and "http://" not in page and "https://" not in page
    for inline in ('setAttribute("style"', "setAttribute('style'", ".innerHTML", "eval(", "new Function"):
        assert inline not in script, inline


# --- token file -------------------------------------------------------------------------------------
def test_tokens_given_by_hash_work_with_their_role(client: TestClient, engine: Engine,
                                                   mappings: MappingSet) -> None:
    schedule(engine, mappings)
    assert client.get("/api/procedures", headers=bearer(HASHED_READ)).json()["total"] == 1
    assert client.delete("/api/steps/1", headers=bearer(HASHED_READ)).status_code == 403
    assert client.get("/api/procedures", headers=bearer(HASHED_WRITE)).status_code == 200
    assert client.get("/api/procedures", headers=bearer(HASHED_AUDIT)).status_code == 403
    assert client.get("/api/procedures", headers=bearer(READ)).status_code == 200  # plain tokens still work
    cancelled = client.delete("/api/steps/1", headers=bearer(HASHED_WRITE))
    assert cancelled.status_code == 200
    # The hash itself is no token, in either case.
    for token in (HASHED_READ, HASHED_WRITE):
        digest = hashlib.sha256(token.encode()).hexdigest()
        assert client.get("/api/procedures", headers=bearer(digest)).status_code == 401
        assert client.get("/api/procedures", headers=bearer(digest.upper())).status_code == 401


def test_a_file_tokens_label_names_the_caller(tmp_path: Path) -> None:
    tokens = {t.role: t for t in read_tokens_file(tokens_file(tmp_path))}
    assert tokens["read"].label == "ward board"
    assert tokens["audit"].label == "security office"
    assert tokens["write"].label == "token " + hashlib.sha256(HASHED_WRITE.encode()).hexdigest()[:8]


@pytest.mark.parametrize(("line", "problem"), [
    ("not-a-hash read", "64 hex digits"),
    (f"{'ab' * 31} read", "64 hex digits"),
    (f"{'g' * 64} read", "64 hex digits"),
    (f"{'ab' * 32}", "64 hex digits"),
    (f"{'ab' * 32} admin", "read, write, audit"),
])
def test_a_bad_line_of_the_tokens_file_names_its_number(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# tokens\n{token_line(HASHED_READ, 'read')}\n{line}\n")
    with pytest.raises(StartupError) as refused:
        read_tokens_file(path)
    assert "line 3: " in str(refused.value) and problem in str(refused.value)
    assert line.split()[0] not in str(refused.value)  # what the line holds is not echoed


def test_the_same_hash_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{token_line(HASHED_READ, 'read')}\n{token_line(HASHED_READ, 'write')}\n")
    with pytest.raises(StartupError, match="line 2: the same token hash"):
        read_tokens_file(path)


@pytest.mark.parametrize("command", ["web", "run"])
def test_a_bad_tokens_file_stops_the_start_with_the_line_number(tmp_path: Path, command: str) -> None:
    secret = "pasted-plain-token-0123456789"
    path = tmp_path / "tokens"
    path.write_text(f"{token_line(HASHED_READ, 'read')}\n# the next line holds a token, not its hash\n"
                    f"{secret} write\n")
    env = env_for(f"sqlite:///{tmp_path / 'broker.db'}", BROKER_API_TOKENS_FILE=str(path),
                  BROKER_HTTP_PORT=str(free_port()), BROKER_HL7_PORT=str(free_port()),
                  BROKER_DICOM_PORT=str(free_port()))
    started = subprocess.run([sys.executable, "-m", "broker", command], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
    assert started.returncode == 2
    lines = started.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 3" in lines[0] and str(path) in lines[0], started.stderr
    assert secret not in started.stderr


def test_broker_token_hash_prints_the_files_line() -> None:
    token = "ris-portal-token-0123456789"
    printed = subprocess.run([sys.executable, "-m", "broker", "token", "hash", "--role", "write",
                              "--label", "RIS portal"], cwd=ROOT, input=token + "\n", capture_output=True,
                             text=True, timeout=60, env=env_for("sqlite:///:memory:"))
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == f"{hashlib.sha256(token.encode()).hexdigest()} write RIS portal\n"
    assert token not in printed.stdout


# --- audit records ----------------------------------------------------------------------------------
def test_a_read_of_patient_data_is_a_query_record(client: TestClient, recorder: Recorder, engine: Engine,
                                                  mappings: MappingSet) -> None:
    schedule(engine, mappings)
    recorder.events.clear()
    assert client.get("/api/procedures?modality=CT&limit=5", headers=bearer(HASHED_READ)).status_code == 200
    assert client.get("/api/procedures/1/worklist", headers=bearer(READ)).status_code == 200
    assert client.get("/api/steps/1/worklist-item", headers=bearer(READ)).status_code == 200
    assert client.get("/api/messages", headers=bearer(READ)).status_code == 200
    with client.stream("GET", f"/api/stream?token={HASHED_READ}&since=1") as stream:
        assert stream.status_code == 200
    assert client.get("/healthz").status_code == 200  # no patient data: no record
    assert client.get("/api/board/summary", headers=bearer(READ)).status_code == 200  # counts only

    listing, worklist, item, messages, opened = recorder.events
    assert all(e.event_id == QUERY for e in recorder.events)
    requestor = listing.requestor
    assert requestor is not None and requestor.user_id == "ward board" and requestor.host == "testclient"
    [query] = [o for o in listing.objects if o.kind == "query"]
    assert query.object_id == "/api/procedures" and query.query == b"modality=CT&limit=5"
    assert len(listing.patient_ids) == 1 and listing.patient_ids[0].startswith("MRN4711")
    assert worklist.patient_ids == listing.patient_ids == item.patient_ids
    assert worklist.requestor is not None and worklist.requestor.user_id.startswith("token read")
    assert [o.object_id for o in messages.objects if o.kind == "query"] == ["/api/messages"]
    # The stream's token is a secret: it is not in the record.
    [stream_query] = [o for o in opened.objects if o.kind == "query"]
    assert stream_query.object_id == "/api/stream" and stream_query.query == b"since=1"
    assert HASHED_READ.encode() not in repr(opened).encode()


def test_401_and_403_are_security_alerts(client: TestClient, recorder: Recorder) -> None:
    assert client.get("/api/procedures", headers=bearer("wrong-token-0123456789")).status_code == 401
    assert client.get("/api/stream?token=wrong-token-0123456789").status_code == 401
    assert client.delete("/api/steps/1", headers=bearer(HASHED_READ)).status_code == 403
    unknown, stream, forbidden = recorder.events
    for event in recorder.events:
        assert event.event_id == SECURITY_ALERT and event.event_type == (USE_OF_RESTRICTED_FUNCTION,)
        assert event.outcome != 0
    assert unknown.requestor is not None and unknown.requestor.user_id == "anonymous"
    assert [o.object_id for o in unknown.objects] == ["/api/procedures"]
    assert [o.object_id for o in stream.objects] == ["/api/stream"]  # the path only: no token
    assert "wrong-token" not in repr(stream)
    assert forbidden.requestor is not None and forbidden.requestor.user_id == "ward board"
    assert forbidden.requestor.host == "testclient"
    assert [o.object_id for o in forbidden.objects] == ["/api/steps/1"]


def test_a_failed_handshake_is_a_node_authentication_alert() -> None:
    event = handshake_alert(Participant("BROKER", "broker-host"), "192.0.2.7", "UNSUPPORTED_PROTOCOL", 8443)
    assert event.event_id == SECURITY_ALERT and event.event_type == (NODE_AUTHENTICATION,)
    assert event.outcome_description == "UNSUPPORTED_PROTOCOL"
    assert event.requestor is not None and event.requestor.host == "192.0.2.7"
    assert [o.object_id for o in event.objects] == ["https port 8443"]
