"""The association acceptor at the byte level: what a misbehaving or unusual peer gets (PS3.8).

The worklist tests (test_mwl_scp.py) show well-behaved modalities served; these show the upper layer's
answers to everything else: timeouts, garbage, wrong versions and contexts, oversize PDUs, small peer
PDU limits, unknown commands. The requests are encoded by pynetdicom (an independent implementation).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification  # type: ignore[attr-defined]

from broker.config import load_settings
from broker.dicom import dimse, pdu
from broker.dicom.server import DicomServer
from broker.store import migrate
from broker.store.session import make_engine

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomServer]:
    """The AE on an empty worklist, with short timeouts and a 16 KiB receive limit."""
    url = f"sqlite:///{tmp_path_factory.mktemp('acceptor') / 'wl.db'}"
    migrate.upgrade(make_engine(url))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    settings = load_settings(dicom_host="127.0.0.1", dicom_port=port, dicom_acse_timeout=1,
                             dicom_network_timeout=2, dicom_max_pdu=16384)
    dicom = DicomServer(settings, make_engine(url, for_reading=True))
    dicom.start()
    yield dicom
    dicom.stop()


def request_bytes(version: int = 1, application_context: str = pdu.DICOM_APPLICATION_CONTEXT,
                  maximum_length: int = 0, calling_ae: str = "RAWSCU") -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = application_context
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = "BROKER"
    contexts = [build_context(Verification, [ImplicitVRLittleEndian]),
                build_context(ModalityWorklistInformationFind, [ExplicitVRLittleEndian])]
    contexts[0].context_id, contexts[1].context_id = 1, 3
    primitive.presentation_context_definition_list = contexts
    limit = MaximumLengthNotification()
    limit.maximum_length_received = maximum_length
    primitive.user_information = [limit]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    data = bytearray(rq.encode())
    data[6:8] = struct.pack(">H", version)
    return bytes(data)


def associate_raw(port: int, calling_ae: str = "RAWSCU") -> tuple[int, tuple[int, ...]]:
    """Send :func:`request_bytes`; the type of the PDU that answers it, and for a reject its (result,
    source, reason).

    For the tests of rejections: under CPU load pynetdicom's requestor reports a received
    A-ASSOCIATE-RJ as an abort (about 1 in 100 to 1 in 300 rejections, captured on the loopback: the
    acceptor's reject arrives whole and the requestor closes first; its network thread closes the socket
    on the reject, and the requesting thread then takes the closed socket for a failed connection), so
    they read the answer off the wire.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request_bytes(calling_ae=calling_ae))
        pdu_type, body = read_pdu(sock)
    return pdu_type, tuple(body[1:4]) if pdu_type == pdu.A_ASSOCIATE_RJ else ()


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = recv_exact(sock, 6)
    pdu_type, length = pdu.parse_header(header)
    return pdu_type, recv_exact(sock, length)


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def connect(server: DicomServer, maximum_length: int = 0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(request_bytes(maximum_length=maximum_length))
    pdu_type, _ = read_pdu(sock)
    assert pdu_type == pdu.A_ASSOCIATE_AC
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_silence_after_connect_is_closed_after_the_acse_timeout(server: DicomServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        pdu_type, body = read_pdu(sock)  # the A-ABORT, after dicom_acse_timeout (1 s)
        assert (pdu_type, body[2]) == (pdu.A_ABORT, pdu.ABORT_SOURCE_SERVICE_PROVIDER)
        assert closed_by_server(sock)


def test_idle_association_is_aborted_after_the_network_timeout(server: DicomServer) -> None:
    with connect(server) as sock:
        pdu_type, _ = read_pdu(sock)
        assert pdu_type == pdu.A_ABORT


@pytest.mark.parametrize(("garbage", "reason"), [
    (b"\x09\x00\x00\x00\x00\x02\x00\x00", pdu.REASON_UNEXPECTED_PDU),  # unknown type before an association
    (b"\x04\x00\x00\x00\x00\x02\x00\x00", pdu.REASON_UNEXPECTED_PDU),  # P-DATA before an association
])
def test_garbage_before_association_gets_an_abort(server: DicomServer, garbage: bytes, reason: int) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(garbage)
        pdu_type, body = read_pdu(sock)
        assert pdu_type == pdu.A_ABORT and body[3] == reason


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"version": 2}, (1, 2, 2)),  # protocol version not supported
    ({"application_context": "1.2.3.4"}, (1, 1, 2)),  # application context name not supported
])
def test_wrong_version_or_context_gets_a_reject(server: DicomServer, kwargs: dict[str, object],
                                                expected: tuple[int, int, int]) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_bytes(**kwargs))  # type: ignore[arg-type]
        pdu_type, body = read_pdu(sock)
        assert pdu_type == pdu.A_ASSOCIATE_RJ and tuple(body[1:4]) == expected


def echo_request(context_id: int, command_field: int = dimse.C_ECHO_RQ, sop_class: str = Verification) -> bytes:
    command = dimse.encode_command({"AffectedSOPClassUID": sop_class, "CommandField": command_field,
                                    "MessageID": 9, "CommandDataSetType": dimse.NO_DATA_SET})
    return pdu.encode_p_data(context_id, True, command, 0)


def response_command(sock: socket.socket) -> Dataset:
    pdu_type, body = read_pdu(sock)
    assert pdu_type == pdu.P_DATA_TF
    [value] = pdu.parse_p_data(body)
    return read_dataset(BytesIO(value.data), is_implicit_VR=True, is_little_endian=True)


def test_echo_release_over_raw_bytes(server: DicomServer) -> None:
    with connect(server) as sock:
        sock.sendall(echo_request(1))
        command = response_command(sock)
        assert (command.CommandField, command.MessageIDBeingRespondedTo, command.Status) == (0x8030, 9, 0)
        sock.sendall(pdu.header(pdu.A_RELEASE_RQ, 4) + bytes(4))
        assert read_pdu(sock)[0] == pdu.A_RELEASE_RP


def test_unknown_command_on_an_accepted_context_is_answered_not_aborted(server: DicomServer) -> None:
    with connect(server) as sock:
        sock.sendall(echo_request(1, command_field=dimse.N_GET_RQ))
        command = response_command(sock)
        assert (command.CommandField, command.Status) == (dimse.N_GET_RSP, dimse.UNRECOGNIZED_OPERATION)
        sock.sendall(echo_request(1))  # the association goes on
        assert response_command(sock).Status == 0


def test_message_on_a_context_not_accepted_aborts(server: DicomServer) -> None:
    with connect(server) as sock:
        sock.sendall(echo_request(5))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == pdu.A_ABORT and body[3] == pdu.REASON_INVALID_PDU_PARAMETER


def test_pdu_over_the_negotiated_limit_aborts(server: DicomServer) -> None:
    with connect(server) as sock:
        sock.sendall(pdu.encode_p_data(3, False, bytes(20000), 0))
        pdu_type, _ = read_pdu(sock)
        assert pdu_type == pdu.A_ABORT


def test_responses_respect_a_small_peer_pdu_limit(server: DicomServer) -> None:
    """A peer that receives at most 64-byte PDUs gets the C-ECHO response (~80 bytes) in fragments."""
    with connect(server, maximum_length=64) as sock:
        sock.sendall(echo_request(1))
        fragments: list[pdu.PresentationDataValue] = []
        while not (fragments and fragments[-1].is_last):
            pdu_type, body = read_pdu(sock)
            assert pdu_type == pdu.P_DATA_TF and len(body) <= 64
            fragments += pdu.parse_p_data(body)
        assert len(fragments) > 1
        command = read_dataset(BytesIO(b"".join(f.data for f in fragments)), is_implicit_VR=True,
                               is_little_endian=True)
        assert (command.CommandField, command.Status) == (dimse.C_ECHO_RSP, 0)
