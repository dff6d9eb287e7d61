"""HTTPS with real outside clients against a real broker process: ``curl`` (with the test PKI's CA, and
client certificates for mutual TLS), ``openssl s_client``, Python's ``ssl`` and the board in headless
Chromium.

* ``broker web`` with a plain and a TLS port: the API, the board and the live stream over HTTPS with
  the security headers (HSTS over TLS only); the broker's own BCP 195 context is the one used (a
  client offering only a non-forward-secret suite or TLS 1.1 is refused, which uvicorn's default
  context would accept); a failed handshake is logged with peer and reason, a stalled one ends after
  the handshake timeout, and the listener serves on.
* ``broker run`` with HTTPS only and mutual TLS: a client certificate from the CA gets in; none, one
  from another CA and an expired one are refused, each logged.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import ROOT
from tests.integration.test_cli import BROKER, broker_run, env_for, free_port, run_cli, wait_for_port
from tests.tls_support import Pki

pytestmark = pytest.mark.integration
TOKEN = "https-reader-0123456789"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@dataclass
class Running:
    """A broker process: its ports and the file its log (JSON lines) goes to."""

    http_port: int
    tls_port: int
    log: Path
    database_url: str

    def audit_records(self) -> list[tuple[str, str, str, str, dict[str, Any]]]:
        """(event_id, event_type, user_id, host, event) of the audit trail, oldest first."""
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as db:
                rows = db.execute(text("SELECT event_id, event_type, user_id, host, event FROM audit_records "
                                       "ORDER BY id")).all()
        finally:
            engine.dispose()
        return [(r[0], r[1], r[2], r[3], r[4] if isinstance(r[4], dict) else json.loads(r[4])) for r in rows]

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def wait_for_event(self, name: str, count: int, seconds: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + seconds
        while len(self.events(name)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.events(name)


@pytest.fixture(scope="module")
def web(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """``broker web`` on a plain and a TLS port (no client certificate required), handshake timeout 1 s,
    with its own audit writer."""
    directory = tmp_path_factory.mktemp("https-web")
    running = Running(free_port(), free_port(), directory / "broker.log", f"sqlite:///{directory / 'broker.db'}")
    env = env_for(running.database_url, BROKER_HTTP_HOST="127.0.0.1",
                  BROKER_HTTP_PORT=str(running.http_port), BROKER_HTTP_TLS_PORT=str(running.tls_port),
                  BROKER_API_TOKENS=f"{TOKEN}:read", BROKER_TLS_HANDSHAKE_TIMEOUT="1",
                  BROKER_AUDIT_ENABLED="true", BROKER_AUDIT_FLUSH_INTERVAL="0.1", **pki.broker_env())
    assert run_cli("db", "upgrade", env=env).returncode == 0
    with running.log.open("w") as log:
        process = subprocess.Popen([*BROKER, "web"], cwd=ROOT, env=env, stderr=log, text=True)
        try:
            wait_for_port(running.http_port, process)
            wait_for_port(running.tls_port, process)
            yield running
        finally:
            process.terminate()
            assert process.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def mutual(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """``broker run`` with HTTPS only (``BROKER_HTTP_PORT=0``), a client certificate required."""
    directory = tmp_path_factory.mktemp("https-mutual")
    running = Running(0, free_port(), directory / "broker.log", f"sqlite:///{directory / 'broker.db'}")
    hl7, dicom = free_port(), free_port()
    env = env_for(running.database_url, BROKER_HTTP_HOST="127.0.0.1", BROKER_HTTP_PORT="0",
                  BROKER_HTTP_TLS_PORT=str(running.tls_port), BROKER_HTTP_TLS_REQUIRE_CLIENT_CERT="true",
                  BROKER_HL7_PORT=str(hl7), BROKER_DICOM_PORT=str(dicom), BROKER_API_TOKENS=f"{TOKEN}:read",
                  BROKER_AUDIT_ENABLED="false", **pki.broker_env())
    with running.log.open("w") as log, broker_run(env, hl7, dicom, running.tls_port, stderr=log):
        yield running


@dataclass
class Answer:
    code: int
    """curl's exit status (0: a response came)."""
    status: int
    headers: dict[str, str]
    body: str


def curl(url: str, *args: str, pki: Pki | None = None, token: str | None = TOKEN) -> Answer:
    command = ["curl", "-sS", "-i", "--max-time", "10", *args]
    if pki is not None:
        command += ["--cacert", pki.ca]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    done = subprocess.run([*command, url], capture_output=True, timeout=30)  # bytes: the CRLFs stay
    head, _, body = done.stdout.decode("utf-8", errors="replace").partition("\r\n\r\n")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return Answer(done.returncode, status, headers, body)


def assert_security_headers(answer: Answer, *, over_tls: bool) -> None:
    headers = answer.headers
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert "server" not in headers
    if over_tls:
        assert headers["strict-transport-security"] == "max-age=31536000"
    else:
        assert "strict-transport-security" not in headers


# --- broker web: plain and TLS ----------------------------------------------------------------------
def test_the_api_board_and_stream_over_https(web: Running, pki: Pki) -> None:
    api = curl(f"https://localhost:{web.tls_port}/api/procedures", pki=pki)
    assert api.code == 0 and api.status == 200
    assert json.loads(api.body) == {"total": 0, "limit": 100, "offset": 0, "items": []}
    assert_security_headers(api, over_tls=True)
    assert api.headers["cache-control"] == "no-store"

    board = curl(f"https://localhost:{web.tls_port}/board", pki=pki, token=None)
    assert board.status == 200 and "/static/board.js" in board.body
    assert_security_headers(board, over_tls=True)

    plain = curl(f"http://127.0.0.1:{web.http_port}/api/procedures")
    assert plain.status == 200 and plain.headers["cache-control"] == "no-store"
    assert_security_headers(plain, over_tls=False)

    # The live stream: its opening arrives over TLS at once and the stream stays open (curl's time-out).
    stream = curl(f"https://localhost:{web.tls_port}/api/stream?token={TOKEN}", "-N", "--max-time", "2",
                  pki=pki, token=None)
    assert stream.code == 28 and stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-store"
    assert ": connected" in stream.body
    assert not web.events("web.tls_handshake_failed") or all(
        e["reason"] for e in web.events("web.tls_handshake_failed"))


def test_the_brokers_own_tls_profile_is_used(web: Running, pki: Pki) -> None:
    """TLS 1.3 by default; in TLS 1.2 a forward-secret AEAD suite; no suite without forward secrecy
    (uvicorn's own default context would accept AES128-SHA)."""
    context = ssl.create_default_context(cafile=pki.ca)
    with socket.create_connection(("127.0.0.1", web.tls_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.3"
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", web.tls_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        cipher, version, _ = tls.cipher()
        assert version == "TLSv1.2" and cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)
    weak = curl(f"https://localhost:{web.tls_port}/healthz", "--tls-max", "1.2", "--ciphers", "AES128-SHA", pki=pki)
    assert weak.code != 0 and weak.status == 0


def test_old_protocols_are_refused_logged_and_the_listener_serves_on(web: Running, pki: Pki) -> None:
    before = len(web.events("web.tls_handshake_failed"))
    old = curl(f"https://localhost:{web.tls_port}/healthz", "--tlsv1.1", "--tls-max", "1.1", pki=pki)
    assert old.code != 0 and old.status == 0
    s_client = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{web.tls_port}", "-tls1_1",
                               "-cipher", "DEFAULT@SECLEVEL=0", "-CAfile", pki.ca], input="", capture_output=True,
                              text=True, timeout=30)
    assert s_client.returncode != 0 and "BEGIN CERTIFICATE" not in s_client.stdout
    failed = web.wait_for_event("web.tls_handshake_failed", before + 2)[before:]
    assert len(failed) == 2
    for event in failed:
        assert event["peer"] == "127.0.0.1" and event["port"] == web.tls_port
        assert "PROTOCOL" in event["reason"].upper(), event  # the server refused the version itself
        assert event["level"] == "warning"
    assert curl(f"https://localhost:{web.tls_port}/healthz", pki=pki).status == 200


def test_a_client_that_does_not_trust_the_broker_is_logged(web: Running, pki: Pki) -> None:
    before = len(web.events("web.tls_handshake_failed"))
    untrusting = curl(f"https://localhost:{web.tls_port}/healthz", "--cacert", pki.path("rogue-ca.pem"))
    assert untrusting.code == 60  # curl: the peer's certificate is not trusted
    [failed] = web.wait_for_event("web.tls_handshake_failed", before + 1)[before:]
    assert "UNKNOWN_CA" in failed["reason"].upper()


def test_a_stalled_handshake_ends_after_the_timeout_and_others_are_served(web: Running, pki: Pki) -> None:
    before = len(web.events("web.tls_handshake_failed"))
    with socket.create_connection(("127.0.0.1", web.tls_port), timeout=10) as stalled:
        stalled.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and then nothing
        started = time.monotonic()
        assert curl(f"https://localhost:{web.tls_port}/healthz", pki=pki).status == 200  # meanwhile
        assert stalled.recv(1024) == b""  # the broker closed it
        assert 0.8 < time.monotonic() - started < 5
    [failed] = web.wait_for_event("web.tls_handshake_failed", before + 1)[before:]
    assert failed["reason"] == "handshake not completed in time"


def test_a_connection_without_a_handshake_is_no_failure(web: Running) -> None:
    """A port probe (connect, close) is no authentication attempt: no warning, no Security Alert."""
    before = len(web.events("web.tls_handshake_failed"))
    socket.create_connection(("127.0.0.1", web.tls_port), timeout=10).close()
    time.sleep(0.3)
    assert len(web.events("web.tls_handshake_failed")) == before


def test_failed_handshakes_and_reads_are_in_the_audit_trail(web: Running, pki: Pki) -> None:
    before = len(web.audit_records())
    old = curl(f"https://localhost:{web.tls_port}/healthz", "--tlsv1.1", "--tls-max", "1.1", pki=pki)
    assert old.status == 0
    assert curl(f"https://localhost:{web.tls_port}/api/procedures?modality=CT", pki=pki).status == 200
    assert curl(f"https://localhost:{web.tls_port}/api/procedures", pki=pki, token="wrong-0123456789abcdef"
                ).status == 401
    deadline = time.monotonic() + 10
    while len(web.audit_records()) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    handshake, read, refused = web.audit_records()[before:]
    assert handshake[:4] == ("110113", "110126", "anonymous", "127.0.0.1")  # Security Alert, Node Authentication
    assert "PROTOCOL" in json.dumps(handshake[4]).upper()
    assert read[:4] == ("110112", "", "token http…", "127.0.0.1")  # Query, by the token's label
    assert "/api/procedures" in json.dumps(read[4])
    assert refused[:4] == ("110113", "110132", "anonymous", "127.0.0.1")  # Use of Restricted Function


# --- broker run: HTTPS only, mutual TLS ---------------------------------------------------------------
def test_mutual_tls_admits_only_certificates_from_the_ca(mutual: Running, pki: Pki) -> None:
    url = f"https://localhost:{mutual.tls_port}/api/procedures"
    admitted = curl(url, "--cert", pki.client_cert, "--key", pki.client_key, pki=pki)
    assert admitted.status == 200 and json.loads(admitted.body)["total"] == 0
    assert_security_headers(admitted, over_tls=True)

    refused = {"no certificate": curl(url, pki=pki),
               "another CA": curl(url, "--cert", pki.path("rogue.pem"), "--key", pki.path("rogue.key"), pki=pki),
               "expired": curl(url, "--cert", pki.path("expired.pem"), "--key", pki.path("expired.key"), pki=pki)}
    for name, answer in refused.items():
        assert answer.code != 0 and answer.status == 0, name
    failed = mutual.wait_for_event("web.tls_handshake_failed", 3)
    reasons = [event["reason"] for event in failed]
    assert len(reasons) == 3, reasons
    assert "CERTIFICATE" in reasons[0].upper()  # PEER_DID_NOT_RETURN_A_CERTIFICATE
    assert reasons[1].startswith("certificate not accepted") and "issuer" in reasons[1]
    assert reasons[2] == "certificate not accepted: certificate has expired"
    assert all(event["peer"] == "127.0.0.1" for event in failed)
    # the listener serves on
    assert curl(url, "--cert", pki.path("other-client.pem"), "--key", pki.path("other-client.key"),
                pki=pki).status == 200
    [started] = mutual.events("web.started")
    assert started["port"] is None and started["tls_port"] == mutual.tls_port and started["client_cert_required"]


# --- the board in Chromium over HTTPS ---------------------------------------------------------------
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make test installs it)")
def test_the_board_over_https_in_chromium_without_csp_violations(web: Running) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(ignore_https_errors=True)  # the test CA is not in Chromium's store
            # Reported by the page itself (a CSP violation event) and on the console.
            context.add_init_script("window.cspViolations = []; document.addEventListener("
                                    "'securitypolicyviolation', e => window.cspViolations.push("
                                    "e.violatedDirective + ' ' + e.blockedURI));")
            page = context.new_page()
            console: list[str] = []
            page.on("console", lambda message: console.append(message.text))
            page.goto(f"https://localhost:{web.tls_port}/board")
            assert page.evaluate("location.protocol") == "https:"
            page.fill("#token", TOKEN)
            page.click("#token-form button")
            expect(page.locator("#live")).to_have_text("live")  # the stream is connected, over TLS
            expect(page.locator("#groups")).to_contain_text("No procedures")
            page.wait_for_timeout(300)
            assert page.evaluate("window.cspViolations") == []
            assert not [text for text in console if "Content Security Policy" in text], console
        finally:
            browser.close()
