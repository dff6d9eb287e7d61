"""DIMSE messages (PS3.7): command sets encoded and decoded, fragments assembled into messages.

A command set is always Implicit VR Little Endian (PS3.7 6.3.1); the data set that may follow uses the
presentation context's transfer syntax. Command elements are named by their keywords; the encoder
writes the few VRs a command set uses (US, UL, UI, AE, LO, AT) without building a pydicom Dataset,
because one is encoded for every C-FIND response.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from io import BytesIO
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from broker.dicom import wellformed
from broker.dicom.encoding import NotDirectlyEncodable, encode_json_data_set
from broker.dicom.pdu import REASON_NOT_SPECIFIED, PduError, PresentationDataValue
from broker.dicom_json import JsonDataset

# Command Field values (PS3.7 annex E)
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_CANCEL_RQ = 0x0FFF
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_GET_RQ = 0x0110
N_GET_RSP = 0x8110
N_SET_RQ = 0x0120
N_SET_RSP = 0x8120
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130
N_CREATE_RQ = 0x0140
N_CREATE_RSP = 0x8140
N_DELETE_RQ = 0x0150
N_DELETE_RSP = 0x8150

# Command Data Set Type (0000,0800): any other value means a data set follows.
NO_DATA_SET = 0x0101
DATA_SET_PRESENT = 0x0000

# Status values shared by all services (PS3.7 annex C)
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNRECOGNIZED_OPERATION = 0x0211
MISTYPED_ARGUMENT = 0x0212
PROCESSING_FAILURE = 0x0110
# C-FIND's answer to an identifier it cannot use (PS3.4 C.4.1.1.4, K.4.1.1.4: Identifier does not match
# SOP Class); the normalized services answer an undecodable data set with PROCESSING_FAILURE (PS3.7 C.4).
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900

# The elements of a response's status that a handler's status data set may carry (PS3.7 C.4).
STATUS_DETAIL_KEYWORDS = ("OffendingElement", "ErrorComment", "ErrorID", "AttributeIdentifierList")


@cache
def _tag_and_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None or tag >> 16 != 0:
        raise KeyError(f"{keyword} is not a command element")
    return tag, dictionary_VR(tag)


def _value_bytes(vr: str, value: Any) -> bytes:
    if vr == "US":
        return struct.pack("<H", value)
    if vr == "UL":
        return struct.pack("<L", value)
    if vr == "AT":
        tags = [value] if isinstance(value, int) else list(value)
        return b"".join(struct.pack("<HH", int(tag) >> 16, int(tag) & 0xFFFF) for tag in tags)
    raw = str(value).encode("ascii" if vr in ("UI", "AE") else "latin-1", errors="replace")
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return raw


def encode_command(elements: Mapping[str, Any]) -> bytes:
    """A command set from ``{keyword: value}`` with its Command Group Length, in tag order.

    ``None`` values are left out. Implicit VR Little Endian: tag (4), length (4), value.
    """
    encoded = []
    for keyword, value in elements.items():
        if value is None:
            continue
        tag, vr = _tag_and_vr(keyword)
        data = _value_bytes(vr, value)
        encoded.append((tag, struct.pack("<HHL", 0, tag & 0xFFFF, len(data)) + data))
    encoded.sort(key=lambda pair: pair[0])
    body = b"".join(chunk for _, chunk in encoded)
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def command_values(data: bytes) -> dict[int, bytes]:
    """The raw values of a command set's elements by tag, without building a pydicom Dataset.

    A requestor waiting for one response needs only its Status and Command Data Set Type (two US
    values); decoding the whole command set with pydicom was a third of the UPS event delivery's CPU.
    Raises :class:`PduError` for a truncated command set.
    """
    values: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            raise PduError("truncated command element")
        group, element, length = struct.unpack_from("<HHL", data, offset)
        offset += 8
        if offset + length > end:
            raise PduError("command element longer than its command set")
        values[group << 16 | element] = data[offset:offset + length]
        offset += length
    return values


def us_value(values: Mapping[int, bytes], keyword: str, default: int) -> int:
    """A US element of :func:`command_values` (``default`` when it is absent or empty)."""
    raw = values.get(_tag_and_vr(keyword)[0], b"")
    return int(struct.unpack_from("<H", raw)[0]) if len(raw) >= 2 else default


def decode_command(data: bytes) -> Dataset:
    """The command set of a request; raises :class:`PduError` when it is not one."""
    try:
        command = read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
        if "CommandField" not in command:
            raise PduError("command set without Command Field")
        int(command.CommandField)
    except PduError:
        raise
    except Exception as exc:
        raise PduError(f"undecodable command set: {exc}") from exc
    return command


def decode_data_set(data: bytes, is_implicit_vr: bool) -> Dataset:
    """A request's data set in the presentation context's (little endian) transfer syntax, checked and
    decoded completely; raises :class:`MalformedDataSet` naming the tag (never the value).

    pydicom reads lazily and forgivingly (see :mod:`broker.dicom.wellformed`): the bytes are checked
    first, then every element (sequence items included) is converted here, so that no handler meets an
    undecodable value half-way through its work. The handlers read most elements anyway, and pydicom
    keeps each converted element, so this costs little more than the handler's own reads.
    """
    wellformed.check(data, is_implicit_vr)
    try:
        dataset = read_dataset(BytesIO(data), is_implicit_VR=is_implicit_vr, is_little_endian=True)
    except Exception as exc:  # the check above leaves pydicom little to fail on
        raise wellformed.MalformedDataSet(f"undecodable ({type(exc).__name__})") from exc
    _convert_all(dataset)
    return dataset


def _convert_all(dataset: Dataset) -> None:
    """Convert every raw element of ``dataset`` and of its sequences' items into its value."""
    for tag in list(dataset.keys()):
        try:
            element = dataset[tag]
        except Exception as exc:
            raise wellformed.MalformedDataSet(f"{wellformed.tag_text(tag)} cannot be decoded "
                                              f"({type(exc).__name__})", int(tag)) from exc
        if element.VR == "SQ":
            for item in element.value:
                _convert_all(item)


def encode_data_set(dataset: Dataset | JsonDataset, is_implicit_vr: bool) -> bytes:
    """``dataset`` (a pydicom Dataset, or DICOM JSON as worklist items are stored) in the presentation
    context's (little endian) transfer syntax."""
    if isinstance(dataset, dict):
        try:
            return encode_json_data_set(dataset, is_implicit_vr)
        except NotDirectlyEncodable:
            dataset = Dataset.from_json(dataset)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = is_implicit_vr
    buffer.is_little_endian = True
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def status_elements(status: int | Dataset) -> dict[str, Any]:
    """The Status and its detail elements (Error Comment, Offending Element, ...) for a response."""
    if isinstance(status, int):
        return {"Status": status}
    elements: dict[str, Any] = {"Status": int(status.Status)}
    for keyword in STATUS_DETAIL_KEYWORDS:
        if keyword in status:
            value = status[keyword].value
            if keyword == "ErrorComment":
                value = str(value)[:64]
            elements[keyword] = value
    return elements


@dataclass(frozen=True)
class Message:
    """A complete DIMSE message: its context, command set and, when present, its data set bytes."""

    context_id: int
    command: Dataset
    data_set: bytes | None

    @property
    def command_field(self) -> int:
        return int(self.command.CommandField)

    @property
    def message_id(self) -> int:
        return int(self.command.get("MessageID", 0))


class MessageTooLarge(PduError):
    """A DIMSE message (command and data set) longer than the broker takes; the association is aborted."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"DIMSE message of {size} bytes or more, over the limit of {limit}", REASON_NOT_SPECIFIED)
        self.size = size
        self.limit = limit


class MessageAssembler:
    """Collects PDV fragments until a message is complete (PS3.8 annex E: a command, then its data
    set if Command Data Set Type says one follows, each possibly split over many PDVs).

    A message may be at most ``maximum_bytes`` long (command and data set): PS3.8 sets no limit, and
    without one a peer streaming fragments grew the broker by what it sent. The fragment that would
    pass the limit raises :class:`MessageTooLarge` before it is kept, so no more than ``maximum_bytes``
    are ever buffered."""

    def __init__(self, maximum_bytes: int = 16 * 1024 * 1024) -> None:
        self.maximum_bytes = maximum_bytes
        self._context_id: int | None = None
        self._command = bytearray()
        self._data = bytearray()
        self._decoded: Dataset | None = None

    @property
    def in_progress(self) -> bool:
        """Part of a message has arrived and the rest is awaited (the DIMSE timeout applies)."""
        return self._context_id is not None

    def add(self, values: Sequence[PresentationDataValue]) -> list[Message]:
        """Add the PDVs of one P-DATA-TF; return the messages they complete."""
        complete = []
        for value in values:
            if self._context_id is None:
                self._context_id = value.context_id
            elif value.context_id != self._context_id:
                raise PduError("a message's fragments arrived on two presentation contexts")
            size = len(self._command) + len(self._data) + len(value.data)
            if size > self.maximum_bytes:
                raise MessageTooLarge(size, self.maximum_bytes)
            if value.is_command:
                if self._decoded is not None:
                    raise PduError("command fragment where a data set fragment was expected")
                self._command += value.data
                if value.is_last:
                    self._decoded = decode_command(bytes(self._command))
                    if int(self._decoded.get("CommandDataSetType", NO_DATA_SET)) == NO_DATA_SET:
                        complete.append(self._finish(None))
            else:
                if self._decoded is None:
                    raise PduError("data set fragment before its command")
                self._data += value.data
                if value.is_last:
                    complete.append(self._finish(bytes(self._data)))
        return complete

    def _finish(self, data_set: bytes | None) -> Message:
        assert self._context_id is not None and self._decoded is not None
        message = Message(self._context_id, self._decoded, data_set)
        self._context_id, self._decoded = None, None
        self._command.clear()
        self._data.clear()
        return message
