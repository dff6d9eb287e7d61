"""HL7 over TLS, with real clients: MLLP on the TLS port (``hl7_tls_port``), in process and from ``broker run``
(threads and intake processes), and the status messages the broker sends to a RIS that requires TLS.

Clients: the project's :class:`MLLPClient` with an ``ssl.SSLContext``, a raw ``ssl`` socket and
``openssl s_client``. Refused: no client certificate, one from an untrusted CA, an expired one, TLS 1.1
only, and a client that never completes the handshake; after each a good client is still served, and
the refusal is logged as ``hl7.tls_handshake_failed`` with the peer and the reason.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import structlog
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from broker.audit import events as audit_events
from broker.audit.stored import from_json
from broker.audit.trail import AuditWriter
from broker.config import Settings, load_settings
from broker.events.wiring import EventPath
from broker.hl7.mllp import FrameDecoder, MLLPServer, Peer, ServerThread, encode_frame, run_in_thread
from broker.hl7.mllp_client import MLLPClient, MLLPError
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.store.tables import AuditRecord, InboundMessage, table_of
from broker.tls import server_context
from tests.conftest import sample
from tests.events_support import TestRis, mpps_create, mpps_final, orc, outbox, schedule
from tests.hl7_support import msa_code
from tests.integration.test_cli import broker_run, env_for, free_port
from tests.tls_support import Pki

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
HOST = "127.0.0.1"
REFUSED_CLIENTS = ("no certificate", "untrusted CA", "expired")


def broker_tls_settings(pki: Pki, **extra: Any) -> Settings:
    return load_settings(tls_certificate=pki.server_cert, tls_private_key=pki.server_key, tls_ca_bundle=pki.ca,
                         **extra)


def client_context(pki: Pki, certificate: str | None = "client") -> ssl.SSLContext:
    """What an HL7 sender with Python's ``ssl`` does: trust the CA, present ``certificate`` (if any)."""
    context = ssl.create_default_context(cafile=pki.ca)
    if certificate is not None:
        context.load_cert_chain(pki.path(f"{certificate}.pem"), pki.path(f"{certificate}.key"))
    return context


def refused_client_context(pki: Pki, which: str) -> ssl.SSLContext:
    return client_context(pki, {"no certificate": None, "untrusted CA": "rogue", "expired": "expired"}[which])


def order(number: int) -> bytes:
    """A new order with its own control ID and order, procedure and study numbers."""
    return sample("orm_o01_new.hl7").replace(b"RIS000101", b"TLS%06d" % number).replace(b"77001", b"%d" % number)


def echo(message: bytes, peer: Peer) -> list[bytes]:
    return [b"ACK|" + message]


@contextmanager
def tls_server(pki: Pki, handler: Callable[[bytes, Peer], list[bytes]] = echo, *, plain: bool = False,
               **options: Any) -> Iterator[ServerThread]:
    """An MLLP server on a TLS port requiring a client certificate (and a plain port beside it if asked)."""
    context = server_context(broker_tls_settings(pki), require_client_cert=True)
    server = MLLPServer(handler, host=HOST, port=0 if plain else None, tls_port=0, tls_context=context,
                        idle_timeout=30, **options)
    with run_in_thread(server) as thread:
        yield thread


def refused(port: int, context: ssl.SSLContext) -> bool:
    """True if a client with ``context`` gets no reply: the handshake fails, or (TLS 1.3, where the
    client finishes first) the server's alert or close comes instead of the ACK."""
    try:
        with MLLPClient(HOST, port, timeout=5, ssl_context=context) as client:
            client.send(b"MSH|refused?")
    except MLLPError:
        return True
    return False


def openssl_client(port: int, pki: Pki, *protocol: str) -> subprocess.CompletedProcess[str]:
    """``openssl s_client`` with the good client certificate, restricted to ``protocol`` options."""
    return subprocess.run(["openssl", "s_client", "-connect", f"{HOST}:{port}", *protocol,
                           "-CAfile", pki.ca, "-cert", pki.client_cert, "-key", pki.client_key],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


TLS_1_1_ONLY = ("-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")


def failures(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if event["event"] == "hl7.tls_handshake_failed"]


def json_events(text: str) -> list[dict[str, Any]]:
    """The JSON log events in ``text``. Read object by object, not line by line: ``print`` writes an event
    and its newline separately, so another process's event may come between the two."""
    decoder, events, position = json.JSONDecoder(), [], 0
    while (start := text.find("{", position)) >= 0:
        event, position = decoder.raw_decode(text, start)
        events.append(event)
    return events


def mllp_alerts(engine: Engine) -> list[audit_events.AuditEvent]:
    """The Security Alerts recorded about the MLLP ports, oldest first."""
    table = table_of(AuditRecord)
    with engine.connect() as db:
        recorded = [from_json(row.event) for row in db.execute(select(table).order_by(table.c.id))]
    return [event for event in recorded if event.event_id == audit_events.SECURITY_ALERT
            and any(o.object_id.startswith("MLLP port") for o in event.objects)]


def wait_until(condition: Callable[[], object], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- in process ------------------------------------------------------------------------------------------


def test_orders_on_one_tls_connection_are_acked_and_stored(engine: Engine, mappings: MappingSet, pki: Pki) -> None:
    with tls_server(pki, Intake(engine, mappings), workers=2) as thread:
        with MLLPClient(HOST, thread.server.tls_port, ssl_context=client_context(pki)) as client:
            assert client._sock is not None
            connection = client._sock
            assert isinstance(connection, ssl.SSLSocket) and connection.version() in ("TLSv1.2", "TLSv1.3")
            codes = [msa_code(client.send(order(number))) for number in range(1, 5)]
            assert client._sock is connection  # one persistent connection for all of them
        with pytest.raises(RuntimeError):
            assert not thread.server.port  # no plain port was asked for
    assert codes == ["AA"] * 4
    with Session(engine) as session:
        stored = session.scalars(select(InboundMessage.control_id).order_by(InboundMessage.id)).all()
    assert stored == [f"TLS{number:06d}" for number in range(1, 5)]


def test_a_raw_ssl_socket_gets_one_ack_per_frame_in_order(pki: Pki) -> None:
    """Two frames in one TLS record, a third split over two records: three replies, in order."""
    with tls_server(pki) as thread, socket.create_connection((HOST, thread.server.tls_port), timeout=5) as raw, \
            client_context(pki).wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(encode_frame(b"MSH|one") + encode_frame(b"MSH|two") + encode_frame(b"MSH|three")[:5])
        sock.sendall(encode_frame(b"MSH|three")[5:])
        decoder, replies = FrameDecoder(1 << 20), []
        while len(replies) < 3:
            replies += decoder.feed(sock.recv(65536))
    assert replies == [b"ACK|MSH|one", b"ACK|MSH|two", b"ACK|MSH|three"]


@pytest.mark.parametrize("which", REFUSED_CLIENTS)
def test_a_client_without_an_accepted_certificate_is_refused_and_logged(pki: Pki, which: str) -> None:
    with tls_server(pki) as thread, structlog.testing.capture_logs() as logs:
        port = thread.server.tls_port
        assert refused(port, refused_client_context(pki, which))
        wait_until(lambda: failures(logs))
        with MLLPClient(HOST, port, ssl_context=client_context(pki)) as client:  # the listener goes on
            assert client.send(b"MSH|after") == b"ACK|MSH|after"
    [failure] = failures(logs)
    assert failure["peer"].startswith(f"{HOST}:") and failure["port"] == port and failure["log_level"] == "warning"
    expected = {"no certificate": "PEER_DID_NOT_RETURN_A_CERTIFICATE", "untrusted CA": "unable to get local issuer",
                "expired": "certificate has expired"}[which]
    assert expected in failure["reason"], failure


def test_a_refused_client_is_a_security_alert(engine: Engine, pki: Pki) -> None:
    writer = AuditWriter(engine, 0.05)
    try:
        with tls_server(pki, audit=writer, ae_title="BROKER") as thread:
            port = thread.server.tls_port
            assert refused(port, refused_client_context(pki, "untrusted CA"))
            wait_until(lambda: mllp_alerts(engine))
    finally:
        writer.close()
    [alert] = mllp_alerts(engine)
    assert alert.event_type == (audit_events.NODE_AUTHENTICATION,) and alert.outcome == audit_events.MINOR_FAILURE
    assert alert.requestor is not None and (alert.requestor.user_id, alert.requestor.host) == ("unknown", HOST)
    assert "unable to get local issuer" in alert.outcome_description
    assert [o.object_id for o in alert.objects] == [f"MLLP port {port}"]
    assert [p.user_id for p in alert.participants if not p.is_requestor] == ["BROKER"]


def test_tls_1_1_is_refused_and_tls_1_2_accepted_with_openssl_s_client(pki: Pki) -> None:
    with tls_server(pki) as thread, structlog.testing.capture_logs() as logs:
        port = thread.server.tls_port
        old = openssl_client(port, pki, *TLS_1_1_ONLY)
        assert old.returncode != 0 and "Cipher is (NONE)" in old.stdout, old.stdout + old.stderr
        wait_until(lambda: failures(logs))
        good = openssl_client(port, pki, "-tls1_2")
        assert good.returncode == 0 and "Protocol  : TLSv1.2" in good.stdout, good.stdout + good.stderr
    [failure] = failures(logs)
    assert "UNSUPPORTED_PROTOCOL" in failure["reason"] or "VERSION" in failure["reason"].upper(), failure


def test_a_client_that_never_completes_the_handshake_costs_only_its_connection(pki: Pki) -> None:
    with tls_server(pki, handshake_timeout=0.5) as thread, structlog.testing.capture_logs() as logs, \
            socket.create_connection((HOST, thread.server.tls_port), timeout=5) as silent:
        started = time.monotonic()
        with MLLPClient(HOST, thread.server.tls_port, ssl_context=client_context(pki)) as client:
            assert client.send(b"MSH|meanwhile") == b"ACK|MSH|meanwhile"
        assert silent.recv(100) == b""  # closed by the server once the handshake time is up
        assert 0.4 < time.monotonic() - started < 5
    [failure] = failures(logs)
    assert failure["reason"] == "handshake not completed in time"


def test_a_port_probe_is_no_handshake_failure(engine: Engine, pki: Pki) -> None:
    """A connection closed before its first byte (a load balancer's health check) is neither logged as a
    failed handshake nor audited; one that sends something else than TLS is both."""
    writer = AuditWriter(engine, 0.05)
    try:
        with tls_server(pki, audit=writer) as thread, structlog.testing.capture_logs() as logs:
            socket.create_connection((HOST, thread.server.tls_port), timeout=5).close()
            wait_until(lambda: any(e.get("reason") == "closed_before_handshake" for e in logs))
            with socket.create_connection((HOST, thread.server.tls_port), timeout=5) as plain:
                plain.sendall(encode_frame(b"MSH|in clear text"))
                try:
                    answer = plain.recv(100)
                except ConnectionResetError:
                    answer = b""
                assert b"ACK" not in answer  # the server's alert or close, never an ACK
                wait_until(lambda: failures(logs))
            writer.flush()
    finally:
        writer.close()
    assert len(failures(logs)) == 1 and len(mllp_alerts(engine)) == 1


def test_plain_and_tls_ports_share_the_connection_limit(pki: Pki) -> None:
    with tls_server(pki, plain=True, max_connections=2) as thread, \
            MLLPClient(HOST, thread.server.port) as plain, \
            MLLPClient(HOST, thread.server.tls_port, ssl_context=client_context(pki)) as secure:
        assert plain.send(b"MSH|plain") == b"ACK|MSH|plain"
        assert secure.send(b"MSH|secure") == b"ACK|MSH|secure"
        assert thread.server.connection_count == 2
        assert refused(thread.server.tls_port, client_context(pki))  # a third one, though its certificate is good
        with pytest.raises(MLLPError), MLLPClient(HOST, thread.server.port, timeout=5) as third:
            third.send(b"MSH|third")


def test_stop_ends_an_idle_tls_connection_with_close_notify(pki: Pki) -> None:
    with tls_server(pki) as thread, socket.create_connection((HOST, thread.server.tls_port), timeout=5) as raw, \
            client_context(pki).wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as sock:
        sock.sendall(encode_frame(b"MSH|x"))
        assert FrameDecoder(1 << 20).feed(sock.recv(65536)) == [b"ACK|MSH|x"]
        stopping = threading.Thread(target=thread.stop)
        stopping.start()
        assert sock.recv(100) == b""  # the server's close_notify: an orderly end, not a truncation
        stopping.join(10)
        assert not stopping.is_alive()


# --- broker run ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", ["0", "2"], ids=["threads", "intake-processes"])
def test_broker_run_serves_mllp_over_tls_only_and_refuses_bad_clients(
        database_url: str, engine: Engine, pki: Pki, processes: str, tmp_path: Any) -> None:
    """TLS only (no plain MLLP port), mutual TLS; with intake processes the TLS connection is handed off
    as a raw socket and the intake process does the handshake."""
    tls_port, http_port = free_port(), free_port()
    env = env_for(database_url, BROKER_HL7_PORT="0", BROKER_HL7_TLS_PORT=str(tls_port),
                  BROKER_HL7_TLS_REQUIRE_CLIENT_CERT="true", BROKER_HL7_PROCESSES=processes,
                  BROKER_DICOM_PORT=str(free_port()), BROKER_HTTP_PORT=str(http_port),
                  **pki.broker_env())
    log_path = tmp_path / "broker.log"
    # Appending: the intake processes write to the same file, each line at its end.
    with open(log_path, "a") as log_file, broker_run(env, http_port, stderr=log_file):  # HTTP starts last
        with MLLPClient(HOST, tls_port, ssl_context=client_context(pki)) as client:
            codes = [msa_code(client.send(order(number))) for number in range(1, 4)]
        for which in REFUSED_CLIENTS:
            assert refused(tls_port, refused_client_context(pki, which)), which
            with MLLPClient(HOST, tls_port, ssl_context=client_context(pki)) as client:
                codes.append(msa_code(client.send(order(len(codes) + 1))))
        old = openssl_client(tls_port, pki, *TLS_1_1_ONLY)
        assert old.returncode != 0 and "Cipher is (NONE)" in old.stdout, old.stdout + old.stderr
        with MLLPClient(HOST, tls_port, ssl_context=client_context(pki)) as client:
            codes.append(msa_code(client.send(order(len(codes) + 1))))
    assert codes == ["AA"] * 7
    with Session(engine) as session:
        assert len(session.scalars(select(InboundMessage.id)).all()) == 7
    events = json_events(log_path.read_text())
    failed = failures(events)
    assert len(failed) == 4, failed
    assert all(event["peer"].startswith(f"{HOST}:") and event["port"] == tls_port for event in failed)
    reasons = [event["reason"] for event in failed]
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reasons[0] and "unable to get local issuer" in reasons[1]
    assert "certificate has expired" in reasons[2] and "UNSUPPORTED_PROTOCOL" in reasons[3], reasons
    established = [event for event in events if event["event"] == "hl7.tls_established"]
    assert len(established) == 5 and {event["client_certificate"] for event in established} == {
        "O=Broker tests,CN=ct01.example.test"}
    started = next(event for event in events if event["event"] == "broker.started")
    assert started["hl7_tls_port"] == tls_port and not started["hl7_port"]
    listening = next(event for event in events if event["event"] == "mllp.listening")
    assert listening["tls_port"] == tls_port and listening["port"] is None  # no plain port
    alerts = mllp_alerts(engine)  # recorded where the handshake failed: in the intake process if there is one
    assert [alert.outcome_description for alert in alerts] == reasons
    assert {(alert.requestor.host if alert.requestor else "", alert.objects[0].object_id) for alert in alerts} == {
        (HOST, f"MLLP port {tls_port}")}
    if processes != "0":
        handed = [event for event in events if event["event"] == "hl7.connection_handed_off"]
        assert len(handed) == 9 and all(event["tls"] for event in handed)  # 5 served, 4 refused


# --- outbound: status messages to a RIS that requires TLS -------------------------------------------------


class TlsRis(TestRis):
    """The test RIS listening with TLS: ``certificate`` from the pki as its own, a client certificate from
    the CA required; remembers the subject of each client that connected."""

    def __init__(self, pki: Pki, certificate: str = "server") -> None:
        super().__init__()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_cert_chain(pki.path(f"{certificate}.pem"), pki.path(f"{certificate}.key"))
        self.clients: list[str] = []

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self.port, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        subject = dict(pair for rdn in writer.get_extra_info("peercert")["subject"] for pair in rdn)
        self.clients.append(subject["commonName"])
        await super()._serve(reader, writer)


@contextmanager
def event_path(engine: Engine, database_url: str, pki: Pki, ris: TestRis) -> Iterator[EventPath]:
    settings = broker_tls_settings(pki, database_url=database_url, redis_url="", ris_hl7_address=f"{HOST}:{ris.port}",
                                   ris_hl7_tls=True, event_backoff_base=0.05, event_backoff_max=0.2,
                                   ris_hl7_ack_timeout=2, event_poll_interval=0.1, event_max_attempts=1000)
    path = EventPath.start(settings, engine)
    try:
        yield path
    finally:
        path.stop()


def test_status_messages_reach_a_ris_that_requires_tls_on_one_connection(
        engine: Engine, database_url: str, mappings: MappingSet, pki: Pki) -> None:
    ris = TlsRis(pki)
    ris.start()
    try:
        order = schedule(engine, mappings)
        with event_path(engine, database_url, pki, ris) as path:
            uid = generate_uid()
            assert path.workflow.mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01").ok
            assert path.workflow.mpps.update(uid, mpps_final(), "CT01").ok
            messages = ris.wait_for(2)
    finally:
        ris.close()
    assert [orc(message) for message in messages] == [("SC", "IP"), ("SC", "CM")]
    assert ris.clients == ["localhost"]  # the broker's certificate, and one persistent connection
    assert {row.status for row in outbox(engine, "ris.status")} == {"done"}


def test_a_ris_with_an_untrusted_certificate_gets_nothing_and_the_status_waits(
        engine: Engine, database_url: str, mappings: MappingSet, pki: Pki) -> None:
    ris = TlsRis(pki, certificate="rogue")
    ris.start()
    try:
        order = schedule(engine, mappings)
        with event_path(engine, database_url, pki, ris) as path:
            uid = generate_uid()
            assert path.workflow.mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01").ok
            wait_until(lambda: [row.attempts >= 2 for row in outbox(engine, "ris.status")] == [True])
    finally:
        ris.close()
    [row] = outbox(engine, "ris.status")
    assert row.status == "pending" and "certificate not accepted" in row.last_error, row.last_error
    assert ris.messages == [] and ris.clients == []
