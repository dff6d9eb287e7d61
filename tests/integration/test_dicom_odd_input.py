"""Odd and hostile input to the DICOM acceptor: what the broker's acceptor makes of requests that are
not what they claim to be, driven from outside over real sockets.

- data sets that cannot be decoded (an element length past the end, a header cut short, garbage) are
  answered with the service's failure status and an Error Comment, for every DIMSE service, and nothing
  of them is stored;
- an association that proposes nothing the broker serves is rejected and holds no slot;
- Explicit VR Little Endian is chosen when both are proposed, in either order;
- a DIMSE message past ``BROKER_DICOM_MAX_MESSAGE_BYTES`` aborts the association before it is buffered
  and the ACSE and DIMSE timeouts bound a whole request, however slowly it is trickled.

The association requests are encoded by pynetdicom; the DIMSE messages with broken data sets are written
byte by byte, since no toolkit sends them.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    InstanceAvailabilityNotification,
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    StorageCommitmentPushModel,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    Verification,
)
from sqlalchemy import Engine

from broker.config import load_settings
from broker.dicom import dimse, pdu
from broker.dicom.server import DicomServer
from broker.dicom.workflow import build_workflow
from broker.store import migrate
from broker.store.session import make_engine
from tests.conftest import module_database
from tests.dicom_support import dicom_server, free_port
from tests.integration.test_cli import broker_run, env_for
from tests.integration.test_dicom_acceptor import read_pdu
from tests.integration.test_ups_scp import get, ups_scu, ups_settings, workitem

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STGCMT_INSTANCE = "1.2.840.10008.1.20.1.1"
# (context ID, abstract syntax, transfer syntax) of the raw associations
MWL_EXPLICIT, MWL_IMPLICIT, UPS_PUSH_CX, UPS_PULL_CX, MPPS_CX, IAN_CX, STGCMT_CX, ECHO_CX = 1, 3, 5, 7, 9, 11, 13, 15
CONTEXTS = [(MWL_EXPLICIT, ModalityWorklistInformationFind, ExplicitVRLittleEndian),
            (MWL_IMPLICIT, ModalityWorklistInformationFind, ImplicitVRLittleEndian),
            (UPS_PUSH_CX, UnifiedProcedureStepPush, ExplicitVRLittleEndian),
            (UPS_PULL_CX, UnifiedProcedureStepPull, ExplicitVRLittleEndian),
            (MPPS_CX, ModalityPerformedProcedureStep, ExplicitVRLittleEndian),
            (IAN_CX, InstanceAvailabilityNotification, ExplicitVRLittleEndian),
            (STGCMT_CX, StorageCommitmentPushModel, ExplicitVRLittleEndian),
            (ECHO_CX, Verification, ImplicitVRLittleEndian)]
IMPLICIT_CONTEXTS = {MWL_IMPLICIT, ECHO_CX}


# --- raw associations --------------------------------------------------------------------------------

def associate_request(contexts: list[tuple[int, str, list[str]]], calling_ae: str = "ODDSCU") -> bytes:
    """An A-ASSOCIATE-RQ proposing ``(context ID, abstract syntax, transfer syntaxes)``, by pynetdicom."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = pdu.DICOM_APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = "BROKER"
    built = []
    for context_id, abstract_syntax, syntaxes in contexts:
        context = build_context(abstract_syntax, syntaxes)
        context.context_id = context_id
        built.append(context)
    primitive.presentation_context_definition_list = built
    limit = MaximumLengthNotification()
    limit.maximum_length_received = 0
    primitive.user_information = [limit]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return bytes(rq.encode())


@contextmanager
def open_association(port: int) -> Iterator[socket.socket]:
    """An association proposing :data:`CONTEXTS`, released at the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(associate_request([(cid, syntax, [ts]) for cid, syntax, ts in CONTEXTS]))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == pdu.A_ASSOCIATE_AC
        accepted = pdu.parse_associate_accept(body).results
        assert all(accepted[cid].result == pdu.ACCEPTANCE for cid, _, _ in CONTEXTS)
        yield sock
        release(sock)


def release(sock: socket.socket) -> None:
    sock.sendall(pdu.header(pdu.A_RELEASE_RQ, 4) + bytes(4))
    assert read_pdu(sock)[0] == pdu.A_RELEASE_RP


def send_request(sock: socket.socket, context_id: int, command: dict[str, object], data: bytes | None) -> None:
    command = {**command, "MessageID": 7,
               "CommandDataSetType": dimse.NO_DATA_SET if data is None else dimse.DATA_SET_PRESENT}
    sock.sendall(pdu.encode_p_data(context_id, True, dimse.encode_command(command), 0))
    if data is not None:
        sock.sendall(pdu.encode_p_data(context_id, False, data, 0))


def read_response(sock: socket.socket) -> tuple[Dataset, bytes | None]:
    """The next response's command set and, when one follows, its data set bytes."""
    pdu_type, body = read_pdu(sock)
    assert pdu_type == pdu.P_DATA_TF, f"PDU type {pdu_type} where a response was expected"
    [value] = pdu.parse_p_data(body)
    assert value.is_command and value.is_last
    command = read_dataset(BytesIO(value.data), is_implicit_VR=True, is_little_endian=True)
    if int(command.CommandDataSetType) == dimse.NO_DATA_SET:
        return command, None
    _, body = read_pdu(sock)
    return command, pdu.parse_p_data(body)[0].data


def echo_works(sock: socket.socket) -> bool:
    send_request(sock, ECHO_CX, {"AffectedSOPClassUID": Verification, "CommandField": dimse.C_ECHO_RQ}, None)
    command, _ = read_response(sock)
    return int(command.CommandField) == dimse.C_ECHO_RSP and int(command.Status) == 0


# --- data sets that cannot be decoded -----------------------------------------------------------------

def element(tag: int, vr: str, value: bytes, implicit: bool, length: int | None = None) -> bytes:
    """One element's bytes; ``length`` overrides the length field (to lie about the value)."""
    size = len(value) if length is None else length
    if implicit:
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, size) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), size) + value


def identifier(implicit: bool) -> bytes:
    """A plain worklist identifier: Patient's Name universal, Patient ID universal."""
    return element(0x00100010, "PN", b"", implicit) + element(0x00100020, "LO", b"", implicit)


def malformed(kind: str, implicit: bool) -> bytes:
    """A data set that begins well and then breaks in the way ``kind`` says."""
    good = identifier(implicit)
    if kind == "length past the end":  # Study Instance UID of 200 bytes, 8 of which follow
        return good + element(0x0020000D, "UI", b"1.2.3.4\x00", implicit, length=200)
    if kind == "header cut short":  # three bytes of a further element's header
        return good + b"\x20\x00\x0d"
    if kind == "sequence item past its end":  # an SPS sequence whose item claims more than the sequence holds
        item = struct.pack("<HHL", 0xFFFE, 0xE000, 500) + element(0x00080060, "CS", b"CT", implicit)
        if implicit:
            return good + struct.pack("<HHL", 0x0040, 0x0100, len(item)) + item
        return good + struct.pack("<HH2sHL", 0x0040, 0x0100, b"SQ", 0, len(item)) + item
    assert kind == "garbage"
    return random.Random(17).randbytes(300)


BROKEN = ["length past the end", "header cut short", "sequence item past its end", "garbage"]


@pytest.fixture(scope="module")
def workflow_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomServer]:
    """The broker's DICOM server with its workflow services (MPPS, IAN, UPS, commitment) on SQLite."""
    for url in module_database("sqlite", tmp_path_factory, "odd"):
        engine: Engine = make_engine(url)
        migrate.upgrade(engine)
        settings = ups_settings(url, "ARCHIVE@127.0.0.1:9")
        with dicom_server(settings, url, build_workflow(settings, engine)) as server:
            yield server
        engine.dispose()


@pytest.mark.parametrize("kind", BROKEN)
@pytest.mark.parametrize("context_id", [MWL_EXPLICIT, MWL_IMPLICIT], ids=["explicit", "implicit"])
def test_worklist_c_find_with_an_undecodable_identifier_gets_a900(workflow_broker: DicomServer, kind: str,
                                                                   context_id: int) -> None:
    """Item 5: no Pending, no Success: one A900 with an Error Comment; the association goes on."""
    with open_association(workflow_broker.port) as sock:
        find = {"AffectedSOPClassUID": ModalityWorklistInformationFind, "CommandField": dimse.C_FIND_RQ,
                "Priority": 0}
        send_request(sock, context_id, find, malformed(kind, context_id in IMPLICIT_CONTEXTS))
        command, data = read_response(sock)
        assert int(command.Status) == 0xA900, hex(int(command.Status))
        assert str(command.ErrorComment).startswith("undecodable identifier: ")
        assert data is None
        if kind == "length past the end":
            assert command.OffendingElement == 0x0020000D
        assert echo_works(sock)  # nothing more was queued for the broken query, and the association goes on
        send_request(sock, context_id, find, identifier(context_id in IMPLICIT_CONTEXTS))
        assert int(read_response(sock)[0].Status) == 0x0000


@pytest.mark.parametrize(("context_id", "command", "expected"), [
    (UPS_PULL_CX, {"AffectedSOPClassUID": UnifiedProcedureStepPull, "CommandField": dimse.C_FIND_RQ,
                   "Priority": 0}, 0xA900),
    (UPS_PUSH_CX, {"AffectedSOPClassUID": UnifiedProcedureStepPush, "CommandField": dimse.N_CREATE_RQ,
                   "AffectedSOPInstanceUID": "2.25.1717"}, 0x0110),
    (UPS_PUSH_CX, {"RequestedSOPClassUID": UnifiedProcedureStepPush, "CommandField": dimse.N_ACTION_RQ,
                   "RequestedSOPInstanceUID": "2.25.1717", "ActionTypeID": 1}, 0x0110),
    (MPPS_CX, {"AffectedSOPClassUID": ModalityPerformedProcedureStep, "CommandField": dimse.N_CREATE_RQ,
               "AffectedSOPInstanceUID": "2.25.1718"}, 0x0110),
    (MPPS_CX, {"RequestedSOPClassUID": ModalityPerformedProcedureStep, "CommandField": dimse.N_SET_RQ,
               "RequestedSOPInstanceUID": "2.25.1718"}, 0x0110),
    (IAN_CX, {"AffectedSOPClassUID": InstanceAvailabilityNotification, "CommandField": dimse.N_CREATE_RQ,
              "AffectedSOPInstanceUID": "2.25.1719"}, 0x0110),
    (STGCMT_CX, {"AffectedSOPClassUID": StorageCommitmentPushModel, "CommandField": dimse.N_EVENT_REPORT_RQ,
                 "AffectedSOPInstanceUID": STGCMT_INSTANCE, "EventTypeID": 1}, 0x0110),
], ids=["ups-c-find", "ups-n-create", "ups-n-action", "mpps-n-create", "mpps-n-set", "ian-n-create",
        "stgcmt-n-event-report"])
@pytest.mark.parametrize("kind", ["length past the end", "garbage"])
def test_every_service_refuses_an_undecodable_data_set(workflow_broker: DicomServer, context_id: int,
                                                       command: dict[str, object], expected: int,
                                                       kind: str) -> None:
    """Item 6: C-FIND A900, the normalized services 0110 (Processing failure), each with an Error
    Comment saying the data set cannot be decoded (not, as before, 0120 "missing: ..." for garbage)."""
    with open_association(workflow_broker.port) as sock:
        send_request(sock, context_id, command, malformed(kind, implicit=False))
        response, data = read_response(sock)
        assert int(response.CommandField) == int(command["CommandField"]) | 0x8000  # type: ignore[call-overload]
        assert int(response.Status) == expected, hex(int(response.Status))
        assert str(response.ErrorComment).startswith("undecodable "), response.ErrorComment
        assert data is None
        assert echo_works(sock)


def test_ups_n_set_with_an_undecodable_modification_list_changes_nothing(workflow_broker: DicomServer) -> None:
    """Item 6: the N-SET got Success and N-GET returned the junk element; now 0110, and nothing stored."""
    uid = str(generate_uid())
    scu = ups_scu(workflow_broker.port, "PERFORMER")
    try:
        status, _ = scu.send_n_create(workitem("CT HEAD"), UnifiedProcedureStepPush, uid)
        assert status and int(status.Status) == 0
        modification = (element(0x00741202, "LO", b"CHANGED ", implicit=False)  # Worklist Label
                        + element(0x0020000D, "UI", b"1.2.3.4\x00", implicit=False, length=200))
        with open_association(workflow_broker.port) as sock:
            send_request(sock, UPS_PUSH_CX, {"RequestedSOPClassUID": UnifiedProcedureStepPush,
                                             "CommandField": dimse.N_SET_RQ, "RequestedSOPInstanceUID": uid},
                         modification)
            response, _ = read_response(sock)
            assert (int(response.Status), str(response.ErrorComment)) == (
                0x0110, "undecodable modification list: (0020,000D) length past the end")
        code, stored = get(scu, uid)
        assert code == 0 and stored is not None
        assert stored.get("WorklistLabel", "") != "CHANGED"
        assert not stored.get("StudyInstanceUID") or "1.2.3.4" not in str(stored.StudyInstanceUID)
    finally:
        scu.release()


# --- negotiation ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomServer]:
    """The worklist AE (empty worklist) admitting one association at a time."""
    url = f"sqlite:///{tmp_path_factory.mktemp('one-slot') / 'wl.db'}"
    migrate.upgrade(make_engine(url))
    settings = load_settings(dicom_host="127.0.0.1", dicom_port=free_port(), dicom_max_associations=1)
    server = DicomServer(settings, make_engine(url, for_reading=True))
    server.start()
    yield server
    server.stop()


def echo_association_established(port: int) -> bool:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="BROKER")
    established = bool(assoc.is_established)
    if established:
        assoc.release()
    return established


def test_nothing_acceptable_is_rejected_and_holds_no_slot(one_slot: DicomServer) -> None:
    """Item 9: A-ASSOCIATE-RJ rejected-permanent, service-user, no-reason-given (as DCMTK's DcmSCP), not an
    A-ASSOCIATE-AC with every context refused that keeps the only association slot."""
    with socket.create_connection(("127.0.0.1", one_slot.port), timeout=15) as sock:
        sock.sendall(associate_request([(1, CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
                                        (3, "1.2.3.4.5.6", [ImplicitVRLittleEndian]),
                                        (5, ModalityWorklistInformationFind, ["1.2.840.10008.1.2.2"])]))
        pdu_type, body = read_pdu(sock)
        assert (pdu_type, tuple(body[1:4])) == (pdu.A_ASSOCIATE_RJ, (1, 1, 1))
        # the connection is still open on our side: the slot must be free nonetheless
        assert echo_association_established(one_slot.port)


@pytest.mark.parametrize("proposed", [[ImplicitVRLittleEndian, ExplicitVRLittleEndian],
                                      [ExplicitVRLittleEndian, ImplicitVRLittleEndian]],
                         ids=["implicit-first", "explicit-first"])
def test_explicit_vr_is_chosen_whatever_the_order(one_slot: DicomServer, proposed: list[str]) -> None:
    """Item 10: the conformance statement (4.2.4) says Explicit VR Little Endian is accepted."""
    with socket.create_connection(("127.0.0.1", one_slot.port), timeout=15) as sock:
        sock.sendall(associate_request([(1, ModalityWorklistInformationFind, proposed),
                                        (3, Verification, proposed)]))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == pdu.A_ASSOCIATE_AC
        results = pdu.parse_associate_accept(body).results
        assert [(r.result, r.transfer_syntax) for r in results.values()] == [
            (pdu.ACCEPTANCE, ExplicitVRLittleEndian)] * 2
        release(sock)


# --- size and time limits ------------------------------------------------------------------------------

def vm_hwm_kib(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_message_past_the_size_limit_aborts_before_it_is_buffered(tmp_path: Path) -> None:
    """Item 7: 96 MB of one C-FIND data set in 64 KB P-DATA fragments grew the broker by about as much;
    with ``BROKER_DICOM_MAX_MESSAGE_BYTES`` 4 MiB the broker aborts once the message passes 4 MiB, and its
    peak memory grows by little more than that."""
    dicom_port = free_port()
    env = env_for(f"sqlite:///{tmp_path / 'broker.db'}", BROKER_HL7_PORT=str(free_port()), BROKER_HTTP_PORT="0",
                  BROKER_DICOM_PORT=str(dicom_port), BROKER_DICOM_HOST="127.0.0.1",
                  BROKER_DICOM_MAX_MESSAGE_BYTES=str(4 * 1024 * 1024))
    with broker_run(env, dicom_port, stderr=subprocess.DEVNULL) as process, \
            socket.create_connection(("127.0.0.1", dicom_port), timeout=30) as sock:
        sock.sendall(associate_request([(1, ModalityWorklistInformationFind, [ExplicitVRLittleEndian])]))
        assert read_pdu(sock)[0] == pdu.A_ASSOCIATE_AC
        before = vm_hwm_kib(process.pid)
        command = dimse.encode_command({"AffectedSOPClassUID": ModalityWorklistInformationFind,
                                        "CommandField": dimse.C_FIND_RQ, "MessageID": 1, "Priority": 0,
                                        "CommandDataSetType": dimse.DATA_SET_PRESENT})
        sock.sendall(pdu.encode_p_data(1, True, command, 0))  # then the data set, never ending
        chunk = bytes(65536 - pdu.PDV_HEADER_LENGTH)  # a data set fragment, never the last
        fragment = struct.pack(">BBLLBB", pdu.P_DATA_TF, 0, len(chunk) + 6, len(chunk) + 2, 1, 0x00) + chunk
        sent = [0]

        def stream() -> None:
            with contextlib.suppress(OSError):
                while sent[0] < 96 * 1024 * 1024:
                    sock.sendall(fragment)
                    sent[0] += len(fragment)

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        pdu_type, body = read_pdu(sock)
        assert (pdu_type, body[2]) == (pdu.A_ABORT, pdu.ABORT_SOURCE_SERVICE_PROVIDER)
        streamer.join(timeout=30)
        grown_mib = (vm_hwm_kib(process.pid) - before) / 1024
        assert grown_mib < 24, f"the broker grew by {grown_mib:.0f} MiB"
        assert sent[0] < 48 * 1024 * 1024, f"the broker read {sent[0]} bytes"


def trickle(sock: socket.socket, data: bytes, seconds_per_byte: float) -> threading.Thread:
    """Send ``data`` one byte every ``seconds_per_byte`` in a thread, until it is sent or the connection ends."""
    def run() -> None:
        with contextlib.suppress(OSError):
            for byte in data:
                sock.sendall(bytes((byte,)))
                time.sleep(seconds_per_byte)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def short_timeouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomServer]:
    """The worklist AE with ACSE and DIMSE timeouts of 2 s and a network timeout of 30 s."""
    url = f"sqlite:///{tmp_path_factory.mktemp('timeouts') / 'wl.db'}"
    migrate.upgrade(make_engine(url))
    settings = load_settings(dicom_host="127.0.0.1", dicom_port=free_port(), dicom_acse_timeout=2,
                             dicom_dimse_timeout=2, dicom_network_timeout=30)
    server = DicomServer(settings, make_engine(url, for_reading=True))
    server.start()
    yield server
    server.stop()


def test_an_association_request_trickled_byte_by_byte_is_cut_off_at_the_acse_timeout(
        short_timeouts: DicomServer) -> None:
    """Item 8: one byte every 0.4 s kept the request alive indefinitely (the timeout was per read)."""
    with socket.create_connection(("127.0.0.1", short_timeouts.port), timeout=30) as sock:
        started = time.monotonic()
        trickle(sock, associate_request([(1, Verification, [ImplicitVRLittleEndian])]), 0.4)
        pdu_type, _ = read_pdu(sock)
        elapsed = time.monotonic() - started
        assert pdu_type == pdu.A_ABORT
        assert 1.5 < elapsed < 4.5, elapsed


def test_a_dimse_message_trickled_byte_by_byte_is_cut_off_at_the_dimse_timeout(
        short_timeouts: DicomServer) -> None:
    """Item 8: once a message has begun, all of it within the DIMSE timeout (here 2 s, the idle timeout
    between messages being 30 s)."""
    with socket.create_connection(("127.0.0.1", short_timeouts.port), timeout=30) as sock:
        sock.sendall(associate_request([(ECHO_CX, Verification, [ImplicitVRLittleEndian])]))
        assert read_pdu(sock)[0] == pdu.A_ASSOCIATE_AC
        assert echo_works(sock)
        command = dimse.encode_command({"AffectedSOPClassUID": Verification, "CommandField": dimse.C_ECHO_RQ,
                                        "MessageID": 8, "CommandDataSetType": dimse.NO_DATA_SET})
        started = time.monotonic()
        trickle(sock, pdu.encode_p_data(ECHO_CX, True, command, 0), 0.4)
        pdu_type, _ = read_pdu(sock)
        elapsed = time.monotonic() - started
        assert pdu_type == pdu.A_ABORT
        assert 1.5 < elapsed < 4.5, elapsed
