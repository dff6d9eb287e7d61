"""The upper-layer PDU codec against pynetdicom's, an independent implementation of PS3.8."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityWorklistInformationFind,
    StorageCommitmentPushModel,
    Verification,
)

from broker.dicom import pdu

STGCMT = StorageCommitmentPushModel


def pynetdicom_request(maximum_length: int = 16384, roles: bool = False) -> bytes:
    """An A-ASSOCIATE-RQ as pynetdicom (a requestor of its own) encodes it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = pdu.DICOM_APPLICATION_CONTEXT
    primitive.calling_ae_title = "CT01"
    primitive.called_ae_title = "BROKER"
    contexts = [build_context(ModalityWorklistInformationFind, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
                build_context(Verification), build_context("1.2.3.4.5.6")]
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = contexts
    limit = MaximumLengthNotification()
    limit.maximum_length_received = maximum_length
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.2.0.0"
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "TESTSCU_1"
    user: list[Any] = [limit, implementation, version]
    if roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = STGCMT
        role.scu_role = False
        role.scp_role = True
        user.append(role)
    primitive.user_information = user
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return bytes(rq.encode())


def test_associate_request_parses_what_pynetdicom_sends() -> None:
    data = pynetdicom_request(roles=True)
    pdu_type, length = pdu.parse_header(data[:6])
    request = pdu.parse_associate_request(data[6:])
    assert (pdu_type, length) == (pdu.A_ASSOCIATE_RQ, len(data) - 6)
    assert request.protocol_version == 1
    assert (request.calling_ae_title, request.called_ae_title) == ("CT01", "BROKER")
    assert request.application_context_name == pdu.DICOM_APPLICATION_CONTEXT
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in request.contexts] == [
        (1, ModalityWorklistInformationFind, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
        (3, Verification, (ImplicitVRLittleEndian, ExplicitVRLittleEndian, "1.2.840.10008.1.2.1.99",
                           "1.2.840.10008.1.2.2")),
        (5, "1.2.3.4.5.6", (ImplicitVRLittleEndian, ExplicitVRLittleEndian, "1.2.840.10008.1.2.1.99",
                            "1.2.840.10008.1.2.2"))]
    assert request.maximum_length == 16384
    assert request.implementation_version_name == "TESTSCU_1"
    assert request.roles == {STGCMT: pdu.RoleSelection(STGCMT, scu_role=False, scp_role=True)}


def test_associate_accept_decodes_in_pynetdicom() -> None:
    request = pdu.parse_associate_request(pynetdicom_request()[6:])
    results = [pdu.ContextResult(1, pdu.ACCEPTANCE, ExplicitVRLittleEndian),
               pdu.ContextResult(3, pdu.ACCEPTANCE, ImplicitVRLittleEndian),
               pdu.ContextResult(5, pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED, ImplicitVRLittleEndian)]
    roles = [pdu.RoleSelection(STGCMT, scu_role=False, scp_role=True)]
    data = pdu.encode_associate_accept(request, results, roles, 32768, "1.2.3.4", "WLBROKER_010")
    ac = A_ASSOCIATE_AC()
    ac.decode(data)
    primitive = ac.to_primitive()
    assert primitive.called_ae_title == "BROKER" and primitive.calling_ae_title == "CT01"
    answered = {c.context_id: (c.result, c.transfer_syntax[0])
                for c in primitive.presentation_context_definition_results_list}
    assert answered[1] == (0, ExplicitVRLittleEndian) and answered[3] == (0, ImplicitVRLittleEndian)
    assert answered[5][0] == pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED
    user: dict[str, Any] = {type(item).__name__: item for item in primitive.user_information}
    assert user["MaximumLengthNotification"].maximum_length_received == 32768
    assert user["ImplementationClassUIDNotification"].implementation_class_uid == "1.2.3.4"
    assert user["ImplementationVersionNameNotification"].implementation_version_name == "WLBROKER_010"
    role = user["SCP_SCU_RoleSelectionNegotiation"]
    assert (role.sop_class_uid, role.scu_role, role.scp_role) == (STGCMT, False, True)


def test_associate_request_as_requestor_decodes_in_pynetdicom() -> None:
    """The broker as requestor (UPS events to subscribers): its A-ASSOCIATE-RQ read by pynetdicom."""
    context = pdu.ProposedContext(1, "1.2.840.10008.5.1.4.34.6.4", (ExplicitVRLittleEndian, ImplicitVRLittleEndian))
    data = pdu.encode_associate_request("SUBSCRIBER", "BROKER", [context], 65536, "1.2.3.4", "WLBROKER_UPS")
    rq = A_ASSOCIATE_RQ()
    rq.decode(data)
    primitive = rq.to_primitive()
    assert (primitive.called_ae_title, primitive.calling_ae_title) == ("SUBSCRIBER", "BROKER")
    assert primitive.application_context_name == pdu.DICOM_APPLICATION_CONTEXT
    [proposed] = primitive.presentation_context_definition_list
    assert (proposed.context_id, proposed.abstract_syntax) == (1, "1.2.840.10008.5.1.4.34.6.4")
    assert list(proposed.transfer_syntax) == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    user: dict[str, Any] = {type(item).__name__: item for item in primitive.user_information}
    assert user["MaximumLengthNotification"].maximum_length_received == 65536
    assert user["ImplementationClassUIDNotification"].implementation_class_uid == "1.2.3.4"
    assert user["ImplementationVersionNameNotification"].implementation_version_name == "WLBROKER_UPS"


def test_associate_accept_is_read_back_per_context() -> None:
    request = pdu.parse_associate_request(pynetdicom_request()[6:])
    results = [pdu.ContextResult(1, pdu.ACCEPTANCE, ImplicitVRLittleEndian),
               pdu.ContextResult(3, pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED, ImplicitVRLittleEndian)]
    accept = pdu.parse_associate_accept(
        pdu.encode_associate_accept(request, results, [], 32768, "1.2.3.4", "WLBROKER_010")[6:])
    assert accept.results == {1: results[0], 3: results[1]}
    assert accept.maximum_length == 32768
    with pytest.raises(pdu.PduError):
        pdu.parse_associate_accept(b"\x00" * 20)


def test_truncated_request_is_a_pdu_error() -> None:
    data = pynetdicom_request()[6:]
    with pytest.raises(pdu.PduError):
        pdu.parse_associate_request(data[:-3])
    with pytest.raises(pdu.PduError):
        pdu.parse_associate_request(data[:40])


@pytest.mark.parametrize("maximum", [0, 16, 4096, 16384])
def test_p_data_fragments_fit_the_peer_limit_and_reassemble(maximum: int) -> None:
    payload = bytes(range(256)) * 40  # 10240 bytes
    stream = pdu.encode_p_data(7, False, payload, maximum)
    pdus, offset = [], 0
    while offset < len(stream):
        pdu_type, length = pdu.parse_header(stream[offset:offset + 6])
        assert pdu_type == pdu.P_DATA_TF
        if maximum:
            assert length <= maximum
        pdus.append(pdu.parse_p_data(stream[offset + 6:offset + 6 + length]))
        offset += 6 + length
    values = [v for found in pdus for v in found]
    assert b"".join(v.data for v in values) == payload
    assert [v.is_last for v in values] == [False] * (len(values) - 1) + [True]
    assert all(v.context_id == 7 and not v.is_command for v in values)


def test_pdv_that_overruns_its_pdu_is_a_pdu_error() -> None:
    body = struct.pack(">LBB", 100, 1, 0x03) + b"\x00" * 10
    with pytest.raises(pdu.PduError):
        pdu.parse_p_data(body)


def test_reject_release_and_abort_layouts() -> None:
    assert pdu.encode_associate_reject(2, 3, 2) == bytes([3, 0, 0, 0, 0, 4, 0, 2, 3, 2])
    assert pdu.encode_release_response() == bytes([6, 0, 0, 0, 0, 4, 0, 0, 0, 0])
    assert pdu.encode_abort(2, 6) == bytes([7, 0, 0, 0, 0, 4, 0, 0, 2, 6])
