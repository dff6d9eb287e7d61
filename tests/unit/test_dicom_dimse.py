"""DIMSE command sets and message assembly (PS3.7 6.3, PS3.8 annex E)."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from broker.dicom import dimse
from broker.dicom.pdu import PduError, PresentationDataValue


def decoded(data: bytes) -> Dataset:
    return read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)


def test_command_set_round_trips_with_group_length_and_padding() -> None:
    data = dimse.encode_command({
        "AffectedSOPClassUID": "1.2.840.10008.5.1.4.31", "CommandField": dimse.C_FIND_RSP,
        "MessageIDBeingRespondedTo": 7, "CommandDataSetType": dimse.NO_DATA_SET, "Status": 0xC000,
        "ErrorComment": "bad range", "OffendingElement": [0x00400100, 0x00400002], "ErrorID": None})
    command = decoded(data)
    assert command.CommandGroupLength == len(data) - 12
    assert command.AffectedSOPClassUID == "1.2.840.10008.5.1.4.31"
    assert (command.CommandField, command.MessageIDBeingRespondedTo, command.Status) == (0x8020, 7, 0xC000)
    assert command.ErrorComment == "bad range" and "ErrorID" not in command
    assert list(command.OffendingElement) == [0x00400100, 0x00400002]
    assert len(data) % 2 == 0 and [e.tag for e in command] == sorted(e.tag for e in command)


@pytest.mark.filterwarnings("ignore:The value length")
def test_status_data_set_brings_its_details_and_error_comment_is_cut_to_lo() -> None:
    status = Dataset()
    status.Status = 0x0110
    status.ErrorComment = "x" * 80
    status.ErrorID = 0xA710
    assert dimse.status_elements(status) == {"Status": 0x0110, "ErrorComment": "x" * 64, "ErrorID": 0xA710}
    assert dimse.status_elements(0xFF00) == {"Status": 0xFF00}


def command_bytes(field: int, with_data: bool) -> bytes:
    return dimse.encode_command({"CommandField": field, "MessageID": 3, "AffectedSOPClassUID": "1.2.3",
                                 "CommandDataSetType": dimse.DATA_SET_PRESENT if with_data else dimse.NO_DATA_SET})


def test_assembler_joins_fragments_of_command_and_data_set() -> None:
    command = command_bytes(dimse.C_FIND_RQ, with_data=True)
    assembler = dimse.MessageAssembler()
    assert assembler.add([PresentationDataValue(1, True, False, command[:10])]) == []
    assert assembler.in_progress
    assert assembler.add([PresentationDataValue(1, True, True, command[10:]),
                          PresentationDataValue(1, False, False, b"abcd")]) == []
    [message] = assembler.add([PresentationDataValue(1, False, True, b"ef")])
    assert (message.context_id, message.command_field, message.message_id, message.data_set) == (
        1, dimse.C_FIND_RQ, 3, b"abcdef")
    assert not assembler.in_progress


def test_a_command_without_data_set_is_complete_at_once() -> None:
    [message] = dimse.MessageAssembler().add([PresentationDataValue(3, True, True,
                                                                    command_bytes(dimse.C_ECHO_RQ, False))])
    assert message.command_field == dimse.C_ECHO_RQ and message.data_set is None


@pytest.mark.parametrize("values", [
    [PresentationDataValue(1, False, True, b"data first")],
    [PresentationDataValue(1, True, False, b"\x00\x00"), PresentationDataValue(3, True, True, b"\x00\x00")],
    [PresentationDataValue(1, True, True, b"not a command set")],
])
def test_out_of_order_or_garbled_fragments_are_pdu_errors(values: list[PresentationDataValue]) -> None:
    with pytest.raises(PduError):
        dimse.MessageAssembler().add(values)


def test_raw_command_values_give_status_and_data_set_type_as_pydicom_reads_them() -> None:
    """The event sender reads a response's Status without pydicom: it must agree with pydicom."""
    encoded = dimse.encode_command({"AffectedSOPClassUID": "1.2.840.10008.5.1.4.34.6.1",
                                    "CommandField": dimse.N_EVENT_REPORT_RSP, "MessageIDBeingRespondedTo": 7,
                                    "CommandDataSetType": dimse.NO_DATA_SET, "Status": 0xC310})
    values = dimse.command_values(encoded)
    parsed = read_dataset(BytesIO(encoded), is_implicit_VR=True, is_little_endian=True)
    assert dimse.us_value(values, "Status", -1) == parsed.Status == 0xC310
    assert dimse.us_value(values, "CommandDataSetType", 0) == dimse.NO_DATA_SET
    assert dimse.us_value(values, "EventTypeID", -1) == -1  # absent
    with pytest.raises(PduError):
        dimse.command_values(encoded[:-1])


def test_assembler_refuses_a_message_past_its_limit_before_keeping_it() -> None:
    """Issue 17 item 7: fragments are kept up to the limit; the one that would pass it raises, and what
    is buffered never exceeds the limit (the association then aborts)."""
    limit = 100_000
    assembler = dimse.MessageAssembler(limit)
    assembler.add([PresentationDataValue(1, True, True, command_bytes(dimse.C_FIND_RQ, with_data=True))])
    fragment = bytes(16_000)
    with pytest.raises(dimse.MessageTooLarge) as raised:
        for _ in range(100):
            assembler.add([PresentationDataValue(1, False, False, fragment)])
            assert len(assembler._command) + len(assembler._data) <= limit
    assert raised.value.limit == limit and raised.value.size > limit
    assert len(assembler._command) + len(assembler._data) <= limit
