"""DICOM over TLS (PS3.15 Annex B, BCP 195 profile), from outside: ``broker run`` with a plain and a TLS
port, and real clients (DCMTK ``echoscu`` / ``findscu`` with ``+tls``, pynetdicom with an
``ssl.SSLContext``, ``openssl s_client``, Python's ``ssl``).

* Over TLS the worklist answers exactly as on the plain port.
* A client with no certificate, one from an untrusted CA, an expired one, one offering only TLS 1.0 or
  1.1, and one speaking plain DICOM to the TLS port are refused in the handshake: each is logged as
  ``dicom.tls_handshake_failed`` with its reason, and the next good client is served.
* An AE title bound to a certificate (by fingerprint, by common name) associates only over TLS with
  that certificate: A-ASSOCIATE-RJ (1, 1, 3) otherwise, on the plain port too.
* Outbound: UPS event reports and Storage Commitment requests reach a peer of ``dicom_tls_peers`` over
  mutual TLS; a peer whose certificate is not trusted gets nothing, and the event is retried.
* With ``dicom_processes`` = 2 and no plain port (TLS only) both processes serve the TLS port.

The TLS listener does not care which database is behind it: the brokers here run on SQLite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, Association, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityWorklistInformationFind,
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepPull,
    Verification,
)
from sqlalchemy import Engine

from broker.config import Peer, Settings, load_settings
from broker.dicom import pdu
from broker.dicom.association import REJECT_CALLING_AE_NOT_RECOGNIZED
from broker.dicom_json import element, tag_of
from broker.events.wiring import EventPath
from broker.mapping.rules import MappingSet
from broker.outbound.ups_events import build_ups_event_handler
from broker.outbox.runner import Event
from broker.store import migrate
from broker.store.session import make_engine
from tests.dicom_support import StgCmtArchive, wait_until
from tests.events_support import CT_IMAGE, mpps_create, mpps_final, outbox, procedure_state, schedule
from tests.integration.test_cli import broker_run, env_for, free_port
from tests.integration.test_dicom_acceptor import read_pdu, request_bytes
from tests.integration.test_dicom_processes import listeners
from tests.mwl_support import Order, send
from tests.tls_support import Pki

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
FINDSCU = shutil.which("findscu") or "findscu"
ECHOSCU = shutil.which("echoscu") or "echoscu"
OPENSSL = shutil.which("openssl") or "openssl"
HANDSHAKE_TIMEOUT = 3
ORDERS = (Order("TLS1", "CT01"), Order("TLS2", "MR01", modality="MR"))


@dataclass
class TlsBroker:
    """``broker run`` with a plain and a TLS DICOM port; its JSON log lines go to ``log``."""

    dicom_port: int
    tls_port: int
    log: Path
    pki: Pki

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == name:
                found.append(entry)
        return found

    def next_event(self, name: str, before: int) -> dict[str, Any]:
        """The first ``name`` event after the ``before`` there were (waits for it)."""
        wait_until(lambda: len(self.events(name)) > before, 10, name)
        return self.events(name)[before]


@pytest.fixture(scope="module")
def broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    directory = tmp_path_factory.mktemp("dicom-tls")
    hl7_port, dicom_port, tls_port = free_port(), free_port(), free_port()
    env = env_for(f"sqlite:///{directory / 'broker.db'}", BROKER_HL7_PORT=str(hl7_port),
                  BROKER_DICOM_HOST="127.0.0.1", BROKER_DICOM_PORT=str(dicom_port),
                  BROKER_DICOM_TLS_PORT=str(tls_port), BROKER_HTTP_PORT="0",
                  BROKER_DICOM_TLS_AE_CERTIFICATES=f"CT01=sha256:{pki.fingerprint('client.pem')},"
                                                   "MR01=cn:mr01.example.test",
                  BROKER_TLS_HANDSHAKE_TIMEOUT=str(HANDSHAKE_TIMEOUT), **pki.broker_env())
    log = directory / "broker.log"
    with log.open("w") as stderr, broker_run(env, hl7_port, dicom_port, tls_port, stderr=stderr):
        send(hl7_port, *ORDERS)
        yield TlsBroker(dicom_port, tls_port, log, pki)


# --- clients ---------------------------------------------------------------------------------------
def client_context(pki: Pki, certificate: str | None = "client") -> ssl.SSLContext:
    """A modality's context: trusts the broker's CA, shows ``certificate`` (a stem of the pki) if given."""
    context = ssl.create_default_context(cafile=pki.ca)
    if certificate is not None:
        context.load_cert_chain(pki.path(f"{certificate}.pem"), pki.path(f"{certificate}.key"))
    return context


def associate(port: int, calling: str = "PYSCU", context: ssl.SSLContext | None = None) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="BROKER",
                        tls_args=(context, "localhost") if context is not None else None)


def associate_raw(port: int, calling: str, context: ssl.SSLContext | None) -> tuple[int, tuple[int, ...]]:
    """An A-ASSOCIATE-RQ (over TLS with ``context``); the answering PDU's type and, for a reject, its
    (result, source, reason), read off the wire (see ``test_dicom_acceptor.associate_raw`` for why)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        sock = context.wrap_socket(raw, server_hostname="localhost") if context is not None else raw
        sock.sendall(request_bytes(calling_ae=calling))
        pdu_type, body = read_pdu(sock)
    return pdu_type, tuple(body[1:4]) if pdu_type == pdu.A_ASSOCIATE_RJ else ()


def tls_options(pki: Pki, certificate: str = "client") -> list[str]:
    """DCMTK's options for TLS with ``certificate`` (its key, then the certificate) and the broker's CA."""
    return ["+tls", pki.path(f"{certificate}.key"), pki.path(f"{certificate}.pem"), "+cf", pki.ca]


def echoscu(port: int, *options: str, calling: str = "ECHOSCU") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([ECHOSCU, "-aet", calling, "-aec", "BROKER", "-to", "10", *options, "127.0.0.1",
                           str(port)], capture_output=True, timeout=60)


def findscu(port: int, out: Path, *options: str) -> list[dict[str, Any]]:
    """DCMTK findscu -W for every item; the responses as DICOM JSON, by SPS ID."""
    out.mkdir()
    keys = ["PatientID", "PatientName", "AccessionNumber", "StudyInstanceUID",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
            "ScheduledProcedureStepSequence[0].Modality",
            "ScheduledProcedureStepSequence[0].ScheduledStationAETitle"]
    args = [FINDSCU, "-W", "-aet", "FINDSCU", "-aec", "BROKER", "-to", "30", "-X", "-od", str(out), *options]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "LANG": "C"})
    assert result.returncode == 0, result.stderr
    answers = [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]
    return sorted((a.to_json_dict() for a in answers),
                  key=lambda a: str(a["00400100"]["Value"][0]["00400009"]["Value"][0]))


def served(broker: TlsBroker) -> None:
    """A good client still gets in over TLS (the listener survived whatever came before)."""
    result = echoscu(broker.tls_port, *tls_options(broker.pki))
    assert result.returncode == 0, result.stderr


# --- DCMTK and pynetdicom over TLS -----------------------------------------------------------------
def test_echoscu_and_findscu_over_tls_answer_as_the_plain_port(broker: TlsBroker, tmp_path: Path) -> None:
    served(broker)
    over_tls = findscu(broker.tls_port, tmp_path / "tls", *tls_options(broker.pki))
    plain = findscu(broker.dicom_port, tmp_path / "plain")
    assert [a["00400100"]["Value"][0]["00400009"]["Value"] for a in over_tls] == [["TLS1"], ["TLS2"]]
    assert over_tls == plain


def test_pynetdicom_echo_and_find_over_tls(broker: TlsBroker) -> None:
    assoc = associate(broker.tls_port, context=client_context(broker.pki))
    assert assoc.is_established
    try:
        assert int(assoc.send_c_echo().Status) == 0x0000
        identifier = Dataset()
        identifier.PatientID = ""
        step = Dataset()
        step.ScheduledProcedureStepID = ""
        identifier.ScheduledProcedureStepSequence = [step]
        answers = list(assoc.send_c_find(identifier, ModalityWorklistInformationFind))
    finally:
        assoc.release()
    statuses = [int(status.Status) for status, _ in answers]
    assert statuses == [0xFF00, 0xFF00, 0x0000]
    assert sorted(str(found.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID)
                  for _, found in answers[:2]) == ["TLS1", "TLS2"]


# --- refused in the handshake ----------------------------------------------------------------------
def no_certificate(pki: Pki, port: int) -> bool:
    assoc = associate(port, context=client_context(pki, certificate=None))
    if assoc.is_established:
        assoc.release()
        return True
    return False


def dcmtk_with(certificate: str) -> Callable[[Pki, int], bool]:
    def attempt(pki: Pki, port: int) -> bool:
        return echoscu(port, *tls_options(pki, certificate)).returncode == 0
    return attempt


def openssl_with(version: str) -> Callable[[Pki, int], bool]:
    """``openssl s_client`` offering only ``version``, at security level 0 so that the refusal is the
    broker's, not this OpenSSL's own."""
    def attempt(pki: Pki, port: int) -> bool:
        result = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", version,
                                 "-cipher", "DEFAULT:@SECLEVEL=0", "-cert", pki.client_cert, "-key", pki.client_key,
                                 "-CAfile", pki.ca], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=30)
        return result.returncode == 0 and "Cipher is (NONE)" not in result.stdout
    return attempt


def plain_dicom(pki: Pki, port: int) -> bool:
    try:
        pdu_type, _ = associate_raw(port, "PLAINSCU", None)
    except (ConnectionError, OSError):
        return False
    return pdu_type == pdu.A_ASSOCIATE_AC


@pytest.mark.parametrize(("attempt", "reason"), [
    (no_certificate, "CERTIFICATE"),
    (dcmtk_with("rogue"), "unable to get local issuer certificate"),
    (dcmtk_with("expired"), "certificate has expired"),
    (openssl_with("-tls1"), "PROTOCOL"),
    (openssl_with("-tls1_1"), "PROTOCOL"),
    (plain_dicom, "WRONG_VERSION_NUMBER"),
], ids=["no-certificate", "untrusted-ca", "expired", "tls1.0", "tls1.1", "not-tls"])
def test_refused_handshakes_are_logged_and_the_listener_goes_on(broker: TlsBroker,
                                                                attempt: Callable[[Pki, int], bool],
                                                                reason: str) -> None:
    before = len(broker.events("dicom.tls_handshake_failed"))
    assert not attempt(broker.pki, broker.tls_port)
    failed = broker.next_event("dicom.tls_handshake_failed", before)
    assert failed["peer"] == "127.0.0.1" and failed["port"] == broker.tls_port
    assert reason in failed["reason"], failed
    served(broker)


def test_a_port_probe_is_no_failed_handshake(broker: TlsBroker) -> None:
    before = len(broker.events("dicom.closed_before_handshake"))
    failures = len(broker.events("dicom.tls_handshake_failed"))
    socket.create_connection(("127.0.0.1", broker.tls_port), timeout=5).close()
    broker.next_event("dicom.closed_before_handshake", before)
    assert len(broker.events("dicom.tls_handshake_failed")) == failures


def test_a_trickled_handshake_is_cut_off_at_the_handshake_timeout(broker: TlsBroker) -> None:
    """A client that trickles a handshake record a byte at a time: others are served meanwhile, and the
    broker closes it once ``tls_handshake_timeout`` has passed since it connected, however many bytes
    kept coming (one deadline for the whole handshake, not one per read)."""
    before = len(broker.events("dicom.tls_handshake_failed"))
    with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=10) as trickling:
        started = time.monotonic()
        trickling.sendall(b"\x16\x03\x01\x02\x00")  # a handshake record of 512 bytes, to come
        served(broker)
        closed = False
        while not closed and time.monotonic() - started < HANDSHAKE_TIMEOUT + 5:
            try:
                trickling.sendall(b"\x00")
                time.sleep(0.2)
            except OSError:  # reset by the broker
                closed = True
        elapsed = time.monotonic() - started
    assert closed and HANDSHAKE_TIMEOUT - 0.5 <= elapsed <= HANDSHAKE_TIMEOUT + 2, elapsed
    failed = broker.next_event("dicom.tls_handshake_failed", before)
    assert failed["reason"] == "handshake not completed in time"


# --- AE titles bound to certificates ---------------------------------------------------------------
REJECTED = (pdu.A_ASSOCIATE_RJ, REJECT_CALLING_AE_NOT_RECOGNIZED)
ACCEPTED = (pdu.A_ASSOCIATE_AC, ())


@pytest.mark.parametrize(("calling", "certificate", "expected"), [
    ("CT01", "client", ACCEPTED),  # bound by fingerprint to client.pem
    ("CT01", "other-client", REJECTED),
    ("MR01", "other-client", ACCEPTED),  # bound by common name to mr01.example.test
    ("MR01", "client", REJECTED),
    ("US01", "other-client", ACCEPTED),  # not bound: any trusted certificate
])
def test_bound_ae_titles_need_their_certificate(broker: TlsBroker, calling: str, certificate: str,
                                                expected: tuple[int, tuple[int, ...]]) -> None:
    refused = len(broker.events("dicom.association_refused"))
    assert associate_raw(broker.tls_port, calling, client_context(broker.pki, certificate)) == expected
    if expected == REJECTED:
        entry = broker.next_event("dicom.association_refused", refused)
        assert (entry["calling_ae"], entry["reason"]) == (calling, "calling AE title bound to another certificate")


def test_bound_ae_titles_are_refused_on_the_plain_port(broker: TlsBroker) -> None:
    refused = len(broker.events("dicom.association_refused"))
    assert associate_raw(broker.dicom_port, "CT01", None) == REJECTED
    entry = broker.next_event("dicom.association_refused", refused)
    assert entry["reason"] == "calling AE title bound to a certificate, association not over TLS"
    assert associate_raw(broker.dicom_port, "US01", None) == ACCEPTED  # unbound: as before


def test_dcmtk_with_a_bound_title_and_its_certificate(broker: TlsBroker) -> None:
    assert echoscu(broker.tls_port, *tls_options(broker.pki), calling="CT01").returncode == 0
    assert echoscu(broker.tls_port, *tls_options(broker.pki, "other-client"), calling="CT01").returncode != 0


# --- several acceptor processes ----------------------------------------------------------------------
def test_two_acceptor_processes_both_serve_tls_only(pki: Pki, tmp_path: Path) -> None:
    """TLS only (no plain DICOM port), served by both acceptor processes."""
    tls_port = free_port()
    env = env_for(f"sqlite:///{tmp_path / 'broker.db'}", BROKER_HL7_PORT=str(free_port()),
                  BROKER_DICOM_HOST="127.0.0.1", BROKER_DICOM_PORT="0",
                  BROKER_DICOM_TLS_PORT=str(tls_port), BROKER_DICOM_PROCESSES="2", BROKER_HTTP_PORT="0",
                  **pki.broker_env())
    with broker_run(env, tls_port, stderr=subprocess.DEVNULL):
        deadline = time.monotonic() + 30
        while len(listeners(tls_port)) < 2 and time.monotonic() < deadline:  # the second one imports first
            time.sleep(0.2)
        pids = listeners(tls_port)
        assert len(pids) == 2
        held: list[Association] = []
        try:
            # Associations stay open until both processes serve one (the kernel spreads connections
            # over the two by a hash of the addresses).
            while len(held) < 24 and serving(tls_port) != pids:
                assoc = associate(tls_port, context=client_context(pki))
                assert assoc.is_established
                assert int(assoc.send_c_echo().Status) == 0x0000
                held.append(assoc)
            assert serving(tls_port) == pids
        finally:
            for assoc in held:
                assoc.release()


def serving(port: int) -> set[int]:
    """PIDs of the processes holding connections accepted on ``port``."""
    output = subprocess.run(["ss", "-Htnp", "state", "established", f"sport = :{port}"], capture_output=True,
                            text=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", output)}


# --- outbound: UPS event reports and Storage Commitment over TLS ---------------------------------------
def peer_server_context(pki: Pki, certificate: str = "server") -> ssl.SSLContext:
    """A peer's listener: shows ``certificate`` and requires a client certificate from the pki's CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.path(f"{certificate}.pem"), pki.path(f"{certificate}.key"))
    context.load_verify_locations(cafile=pki.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'broker.db'}")
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@dataclass
class TlsSubscriber:
    """A UPS subscriber (pynetdicom) listening with TLS; what it received and which client certificates."""

    context: ssl.SSLContext
    ae_title: str = "TLSSUB"
    port: int = 0
    received: list[tuple[int, str]] | None = None
    clients: list[str] | None = None
    server: Any = None

    def start(self) -> TlsSubscriber:
        self.port, self.received, self.clients = free_port(), [], []
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(UnifiedProcedureStepEvent)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=self.context,
                                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])
        return self

    def _on_report(self, event: Any) -> tuple[int, None]:
        assert self.received is not None and self.clients is not None
        self.received.append((int(event.event_type), str(event.event_information.ProcedureStepState)))
        subject = dict(rdn[0] for rdn in event.assoc.dul.socket.socket.getpeercert()["subject"])
        self.clients.append(subject["commonName"])
        return 0x0000, None

    def stop(self) -> None:
        self.server.shutdown()


def ups_event(number: int, subscriber: str) -> Event:
    info = {tag_of("ProcedureStepState"): element("ProcedureStepState", "SCHEDULED"),
            tag_of("InputReadinessState"): element("InputReadinessState", "READY")}
    return Event(number, f"event-{number}", "ups.event",
                 {"subscriber": subscriber, "uid": str(generate_uid()), "event_type": 1, "info": info},
                 f"ups-subscriber:{subscriber}", 0)


def outbound_settings(pki: Pki, database_url: str, peer: str, tls_peer: str, **extra: Any) -> Settings:
    return load_settings(database_url=database_url, redis_url="", dicom_host="127.0.0.1",
                         dicom_port=free_port(), dicom_peers=peer, dicom_tls_peers=tls_peer,
                         tls_certificate=pki.server_cert, tls_private_key=pki.server_key, tls_ca_bundle=pki.ca,
                         dicom_dimse_timeout=5, **extra)


def test_ups_event_reports_go_to_a_tls_subscriber_with_the_brokers_certificate(pki: Pki,
                                                                               sqlite_engine: Engine) -> None:
    subscriber = TlsSubscriber(peer_server_context(pki)).start()
    try:
        settings = outbound_settings(pki, str(sqlite_engine.url), f"TLSSUB@127.0.0.1:{subscriber.port}", "TLSSUB")
        handler = build_ups_event_handler(settings, sqlite_engine)
        assert handler([ups_event(1, "TLSSUB")]) == {}
        assert subscriber.received == [(1, "SCHEDULED")]
        assert subscriber.clients == ["localhost"]  # the broker showed its certificate (mutual TLS)
    finally:
        subscriber.stop()


def test_a_subscriber_with_an_untrusted_certificate_gets_nothing(pki: Pki, sqlite_engine: Engine) -> None:
    subscriber = TlsSubscriber(peer_server_context(pki, "rogue")).start()
    try:
        settings = outbound_settings(pki, str(sqlite_engine.url), f"TLSSUB@127.0.0.1:{subscriber.port}", "TLSSUB")
        failures = build_ups_event_handler(settings, sqlite_engine)([ups_event(1, "TLSSUB")])
        assert list(failures) == [1]
        assert "certificate not accepted" in str(failures[1])
        assert subscriber.received == []
    finally:
        subscriber.stop()


class TlsArchive(StgCmtArchive):
    """The Storage Commitment archive of ``tests.dicom_support``, listening with TLS."""

    context: ssl.SSLContext | None = None

    def start(self) -> TlsArchive:
        self._server = self.ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=self.context,
                                            evt_handlers=[(evt.EVT_N_ACTION, self._on_action),
                                                          (evt.EVT_DIMSE_SENT, self._on_sent),
                                                          (evt.EVT_RELEASED, self._on_released)])
        return self


def commitment_over_tls(pki: Pki, engine: Engine, mappings: MappingSet, certificate: str,
                        check: Callable[[TlsArchive, int], None]) -> None:
    archive = TlsArchive(mode="same")
    archive.context = peer_server_context(pki, certificate)
    archive.start()
    order = schedule(engine, mappings)
    settings = outbound_settings(pki, str(engine.url), archive.peer_setting(), "ARCHIVE",
                                 stgcmt_archive_ae="ARCHIVE", stgcmt_report_wait=5, event_backoff_base=0.05,
                                 event_backoff_max=0.2, event_poll_interval=0.1)
    path = EventPath.start(settings, engine)
    try:
        uid = str(generate_uid())
        assert path.workflow.mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01").ok
        assert path.workflow.mpps.update(uid, mpps_final("COMPLETED", [str(generate_uid())]), "CT01").ok
        check(archive, order.procedure_pk)
    finally:
        path.stop()
        archive.stop()


def test_storage_commitment_over_tls(pki: Pki, sqlite_engine: Engine, mappings: MappingSet) -> None:
    def archived(archive: TlsArchive, procedure: int) -> None:
        wait_until(lambda: procedure_state(sqlite_engine, procedure) == "ARCHIVED", what="ARCHIVED")
        [action] = archive.actions
        assert action.calling_ae == "BROKER" and action.referenced[0][0] == CT_IMAGE

    commitment_over_tls(pki, sqlite_engine, mappings, "server", archived)
    assert [e.status for e in outbox(sqlite_engine, "stgcmt.request")] == ["done"]


def test_storage_commitment_to_an_untrusted_archive_is_retried(pki: Pki, sqlite_engine: Engine,
                                                               mappings: MappingSet) -> None:
    def retried(archive: TlsArchive, procedure: int) -> None:
        wait_until(lambda: any(e.attempts >= 2 and e.status == "pending"
                               for e in outbox(sqlite_engine, "stgcmt.request")), what="a second attempt")
        [event] = outbox(sqlite_engine, "stgcmt.request")
        assert event.status == "pending" and "over TLS" in event.last_error
        assert archive.actions == [] and procedure_state(sqlite_engine, procedure) == "COMPLETED"

    commitment_over_tls(pki, sqlite_engine, mappings, "rogue", retried)


def test_peer_tls_is_only_for_the_peers_named(pki: Pki) -> None:
    from broker.outbound.dicom_peers import PeerTls

    settings = outbound_settings(pki, "sqlite://", "A@127.0.0.1:104,B@127.0.0.1:105", "B")
    tls = PeerTls(settings)
    assert tls.context_for(Peer("A", "127.0.0.1", 104)) is None
    context = tls.context_for(Peer("B", "127.0.0.1", 105))
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls.tls_args(Peer("B", "127.0.0.1", 105)) == (context, "127.0.0.1")


# --- audit: each C-FIND a Query record, each refusal a Security Alert -----------------------------------
def test_queries_and_refusals_are_audited(pki: Pki, engine: Engine) -> None:
    """The DICOM AE with an audit writer on a real database: a worklist and a UPS C-FIND over TLS, and
    three refusals (an AE title not on the allow-list, a bound AE title with another certificate, a
    client without a certificate); what the writer committed, read back from the table."""
    from broker.audit import events
    from broker.audit.stored import from_json
    from broker.audit.trail import AuditWriter
    from broker.dicom import dimse
    from broker.dicom.listeners import DicomListeners
    from broker.dicom.workflow import build_workflow

    settings = load_settings(database_url=str(engine.url.render_as_string(hide_password=False)), redis_url="",
                             dicom_host="127.0.0.1", dicom_port=free_port(), dicom_tls_port=free_port(),
                             dicom_allowed_callers="PYSCU,CT01", tls_certificate=pki.server_cert,
                             tls_private_key=pki.server_key, tls_ca_bundle=pki.ca,
                             dicom_tls_ae_certificates=f"CT01=sha256:{pki.fingerprint('client.pem')}")
    writer = AuditWriter(engine, 0.05)
    reader = make_engine(settings.database_url, for_reading=True)
    dicom = DicomListeners(settings, reader, build_workflow(settings, engine), audit=writer)
    dicom.start()
    assert dicom.tls_port is not None and dicom.plain_port is not None
    identifier = Dataset()
    identifier.PatientID = "P*"
    identifier.ScheduledProcedureStepSequence = [Dataset()]
    identifier.ScheduledProcedureStepSequence[0].Modality = "CT"
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(ModalityWorklistInformationFind)
        ae.add_requested_context(UnifiedProcedureStepPull)
        assoc = ae.associate("127.0.0.1", dicom.tls_port, ae_title="BROKER",
                             tls_args=(client_context(pki), "localhost"))
        assert assoc.is_established
        try:
            assert [int(s.Status) for s, _ in assoc.send_c_find(identifier, ModalityWorklistInformationFind)] == [0]
            ups_query = Dataset()
            ups_query.ProcedureStepState = "SCHEDULED"
            assert [int(s.Status) for s, _ in assoc.send_c_find(ups_query, UnifiedProcedureStepPull)] == [0]
        finally:
            assoc.release()
        assert associate_raw(dicom.plain_port, "STRANGER", None) == REJECTED
        assert associate_raw(dicom.tls_port, "CT01", client_context(pki, "other-client")) == REJECTED
        assert not no_certificate(pki, dicom.tls_port)
        wait_until(lambda: writer.queued == 0 and len(records(engine)) >= 5, what="five audit records")
    finally:
        dicom.stop()
        writer.close()
        reader.dispose()

    recorded = [from_json(row.event) for row in records(engine)]
    queries = [e for e in recorded if e.event_id == events.QUERY]
    alerts = [e for e in recorded if e.event_id == events.SECURITY_ALERT]
    assert len(queries) == 2 and len(alerts) == 3
    mwl, ups = (next(o for o in q.objects if o.kind == "query") for q in queries)
    for query in queries:
        assert query.requestor is not None
        assert (query.requestor.user_id, query.requestor.host) == ("PYSCU", "127.0.0.1")
    assert (mwl.object_id, ups.object_id) == (ModalityWorklistInformationFind, UnifiedProcedureStepPull)
    assert dict(mwl.details) == {"TransferSyntax": "1.2.840.10008.1.2.1"}  # Explicit VR Little Endian
    # The identifier as it came: its bytes decode to what the modality asked.
    assert dimse.decode_data_set(mwl.query, False) == identifier
    assert dimse.decode_data_set(ups.query, False) == ups_query
    for alert in alerts:
        assert alert.event_type == (events.NODE_AUTHENTICATION,) and alert.outcome == events.MINOR_FAILURE
    assert [(a.requestor.user_id if a.requestor else "", a.outcome_description) for a in alerts] == [
        ("STRANGER", "calling AE title not on the allow-list"),
        ("CT01", "calling AE title bound to another certificate"),
        ("127.0.0.1", "TLS handshake failed: PEER_DID_NOT_RETURN_A_CERTIFICATE")]


def records(engine: Engine) -> list[Any]:
    from sqlalchemy import select

    from broker.store.tables import AuditRecord, table_of

    table = table_of(AuditRecord)
    with engine.connect() as db:
        return list(db.execute(select(table).order_by(table.c.id)))
