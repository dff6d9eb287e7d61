"""DICOM Upper Layer PDUs (PS3.8 section 9.3): the association request parsed, the answers encoded.

The broker's acceptor speaks the upper layer itself (see :mod:`broker.dicom.association` for why); this
module is the byte layout only: no sockets, no state. Every multi-byte field is big endian (PS3.8 9.3.1).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

# PDU types (PS3.8 table 9-11)
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_TYPES = frozenset(range(0x01, 0x08))

# Item types (PS3.8 9.3.2 and annex D)
_APPLICATION_CONTEXT = 0x10
_PRESENTATION_CONTEXT_RQ = 0x20
_PRESENTATION_CONTEXT_AC = 0x21
_ABSTRACT_SYNTAX = 0x30
_TRANSFER_SYNTAX = 0x40
_USER_INFORMATION = 0x50
_MAXIMUM_LENGTH = 0x51
_IMPLEMENTATION_CLASS_UID = 0x52
_ROLE_SELECTION = 0x54
_IMPLEMENTATION_VERSION_NAME = 0x55

DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
PDU_HEADER_LENGTH = 6
# A PDV item's header: item length (4) + presentation context ID (1) + message control header (1)
PDV_HEADER_LENGTH = 6

# Presentation context results (PS3.8 table 9-18)
ACCEPTANCE = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# A-ABORT sources and reasons (PS3.8 table 9-26)
ABORT_SOURCE_SERVICE_USER = 0
ABORT_SOURCE_SERVICE_PROVIDER = 2
REASON_NOT_SPECIFIED = 0
REASON_UNRECOGNIZED_PDU = 1
REASON_UNEXPECTED_PDU = 2
REASON_INVALID_PDU_PARAMETER = 6


class PduError(Exception):
    """A PDU that cannot be parsed; the association is aborted with ``reason``."""

    def __init__(self, text: str, reason: int = REASON_INVALID_PDU_PARAMETER) -> None:
        super().__init__(text)
        self.reason = reason


@dataclass(frozen=True)
class ProposedContext:
    """One presentation context of an A-ASSOCIATE-RQ."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class RoleSelection:
    """An SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4): the roles the requestor asks to play."""

    sop_class_uid: str
    scu_role: bool
    scp_role: bool


@dataclass(frozen=True)
class AssociateRequest:
    """What an A-ASSOCIATE-RQ asks for. ``maximum_length`` 0 means the requestor sets no limit."""

    protocol_version: int
    called_ae_title: str
    calling_ae_title: str
    application_context_name: str
    contexts: tuple[ProposedContext, ...]
    maximum_length: int = 0
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    roles: dict[str, RoleSelection] = field(default_factory=dict)
    # The two AE title fields as sent: the A-ASSOCIATE-AC returns them unchanged (PS3.8 9.3.3).
    raw_ae_titles: bytes = b" " * 32


@dataclass(frozen=True)
class ContextResult:
    """The answer to one proposed presentation context."""

    context_id: int
    result: int
    transfer_syntax: str


def header(pdu_type: int, length: int) -> bytes:
    """The six-byte PDU header."""
    return struct.pack(">BBL", pdu_type, 0, length)


def parse_header(data: bytes) -> tuple[int, int]:
    """PDU type and length from a six-byte header."""
    pdu_type, _, length = struct.unpack(">BBL", data)
    return int(pdu_type), int(length)


def _text(data: bytes) -> str:
    """A UID or AE title field: ASCII, padded with spaces or NULs."""
    return data.decode("ascii", errors="replace").strip(" \x00")


def _items(body: bytes | memoryview, start: int = 0) -> Iterable[tuple[int, memoryview]]:
    """The (type, value) items of a variable field, each ``type, reserved, length (2), value``."""
    view = memoryview(body)
    offset = start
    while offset < len(view):
        if offset + 4 > len(view):
            raise PduError("truncated item header")
        item_type = view[offset]
        (length,) = struct.unpack_from(">H", view, offset + 2)
        end = offset + 4 + length
        if end > len(view):
            raise PduError(f"item 0x{item_type:02X} runs past the end of its PDU")
        yield item_type, view[offset + 4:end]
        offset = end


def parse_associate_request(body: bytes) -> AssociateRequest:
    """Parse the body (after the six-byte header) of an A-ASSOCIATE-RQ; raises :class:`PduError`."""
    if len(body) < 68:
        raise PduError("A-ASSOCIATE-RQ shorter than its fixed fields")
    (protocol_version,) = struct.unpack_from(">H", body, 0)
    called, calling = _text(body[4:20]), _text(body[20:36])
    application_context = ""
    contexts: list[ProposedContext] = []
    user: dict[str, object] = {"roles": {}}
    for item_type, value in _items(body, 68):
        if item_type == _APPLICATION_CONTEXT:
            application_context = _text(bytes(value))
        elif item_type == _PRESENTATION_CONTEXT_RQ:
            contexts.append(_proposed_context(value))
        elif item_type == _USER_INFORMATION:
            user = _user_information(value)
        # other item types are skipped, as PS3.8 9.3.1 asks of an acceptor
    roles = user.pop("roles")
    return AssociateRequest(
        protocol_version=int(protocol_version), called_ae_title=called, calling_ae_title=calling,
        application_context_name=application_context, contexts=tuple(contexts),
        roles=roles,  # type: ignore[arg-type]
        raw_ae_titles=bytes(body[4:36]), **user)  # type: ignore[arg-type]


def _proposed_context(value: memoryview) -> ProposedContext:
    if len(value) < 4:
        raise PduError("presentation context item too short")
    abstract_syntax = ""
    transfer_syntaxes: list[str] = []
    for sub_type, sub_value in _items(value, 4):
        if sub_type == _ABSTRACT_SYNTAX:
            abstract_syntax = _text(bytes(sub_value))
        elif sub_type == _TRANSFER_SYNTAX:
            transfer_syntaxes.append(_text(bytes(sub_value)))
    return ProposedContext(int(value[0]), abstract_syntax, tuple(transfer_syntaxes))


def _user_information(value: memoryview) -> dict[str, object]:
    found: dict[str, object] = {}
    roles: dict[str, RoleSelection] = {}
    for sub_type, sub_value in _items(value):
        if sub_type == _MAXIMUM_LENGTH and len(sub_value) == 4:
            found["maximum_length"] = struct.unpack(">L", sub_value)[0]
        elif sub_type == _IMPLEMENTATION_CLASS_UID:
            found["implementation_class_uid"] = _text(bytes(sub_value))
        elif sub_type == _IMPLEMENTATION_VERSION_NAME:
            found["implementation_version_name"] = _text(bytes(sub_value))
        elif sub_type == _ROLE_SELECTION and len(sub_value) >= 2:
            (uid_length,) = struct.unpack_from(">H", sub_value, 0)
            if len(sub_value) < 2 + uid_length + 2:
                raise PduError("role selection item too short")
            uid = _text(bytes(sub_value[2:2 + uid_length]))
            roles[uid] = RoleSelection(uid, bool(sub_value[2 + uid_length]), bool(sub_value[3 + uid_length]))
        # asynchronous operations window, extended negotiation and user identity are not answered:
        # the defaults (one outstanding operation, no extended features, no identity check) apply.
    found["roles"] = roles
    return found


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def encode_associate_accept(request: AssociateRequest, results: Iterable[ContextResult],
                            roles: Iterable[RoleSelection], maximum_length: int,
                            implementation_class_uid: str, implementation_version_name: str) -> bytes:
    """An A-ASSOCIATE-AC answering ``request`` (PS3.8 9.3.3), with our limits and implementation."""
    variable = [_item(_APPLICATION_CONTEXT, _uid(DICOM_APPLICATION_CONTEXT))]
    for result in results:
        variable.append(_item(_PRESENTATION_CONTEXT_AC,
                              struct.pack(">BBBB", result.context_id, 0, result.result, 0)
                              + _item(_TRANSFER_SYNTAX, _uid(result.transfer_syntax))))
    user = [_item(_MAXIMUM_LENGTH, struct.pack(">L", maximum_length)),
            _item(_IMPLEMENTATION_CLASS_UID, _uid(implementation_class_uid))]
    for role in roles:
        uid = _uid(role.sop_class_uid)
        user.append(_item(_ROLE_SELECTION, struct.pack(">H", len(uid)) + uid
                          + bytes((int(role.scu_role), int(role.scp_role)))))
    user.append(_item(_IMPLEMENTATION_VERSION_NAME, implementation_version_name.encode("ascii")))
    variable.append(_item(_USER_INFORMATION, b"".join(user)))
    body = struct.pack(">HH", 1, 0) + request.raw_ae_titles + bytes(32) + b"".join(variable)
    return header(A_ASSOCIATE_AC, len(body)) + body


@dataclass(frozen=True)
class AssociateAccept:
    """What an A-ASSOCIATE-AC answered, as the requestor reads it. ``maximum_length`` None: the acceptor
    sent no Maximum Length sub-item; 0: it sets no limit."""

    results: dict[int, ContextResult]
    maximum_length: int | None = None


def encode_associate_request(called_ae_title: str, calling_ae_title: str, contexts: Iterable[ProposedContext],
                             maximum_length: int, implementation_class_uid: str,
                             implementation_version_name: str) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) proposing ``contexts``, for the broker as requestor."""
    variable = [_item(_APPLICATION_CONTEXT, _uid(DICOM_APPLICATION_CONTEXT))]
    for context in contexts:
        variable.append(_item(_PRESENTATION_CONTEXT_RQ, struct.pack(">BBBB", context.context_id, 0, 0, 0)
                              + _item(_ABSTRACT_SYNTAX, _uid(context.abstract_syntax))
                              + b"".join(_item(_TRANSFER_SYNTAX, _uid(ts)) for ts in context.transfer_syntaxes)))
    variable.append(_item(_USER_INFORMATION, _item(_MAXIMUM_LENGTH, struct.pack(">L", maximum_length))
                          + _item(_IMPLEMENTATION_CLASS_UID, _uid(implementation_class_uid))
                          + _item(_IMPLEMENTATION_VERSION_NAME, implementation_version_name.encode("ascii"))))
    body = (struct.pack(">HH", 1, 0) + called_ae_title.encode("ascii").ljust(16)[:16]
            + calling_ae_title.encode("ascii").ljust(16)[:16] + bytes(32) + b"".join(variable))
    return header(A_ASSOCIATE_RQ, len(body)) + body


def parse_associate_accept(body: bytes) -> AssociateAccept:
    """The body (after the 6-byte header) of an A-ASSOCIATE-AC: each context's result and transfer
    syntax, and the acceptor's Maximum Length."""
    if len(body) < 68:
        raise PduError("A-ASSOCIATE-AC shorter than its fixed fields")
    results: dict[int, ContextResult] = {}
    maximum_length: int | None = None
    for item_type, value in _items(body, 68):
        if item_type == _PRESENTATION_CONTEXT_AC and len(value) >= 4:
            syntaxes = [_text(bytes(v)) for t, v in _items(value, 4) if t == _TRANSFER_SYNTAX]
            results[value[0]] = ContextResult(value[0], value[2], syntaxes[0] if syntaxes else "")
        elif item_type == _USER_INFORMATION:
            for sub_type, sub_value in _items(value):
                if sub_type == _MAXIMUM_LENGTH and len(sub_value) == 4:
                    (maximum_length,) = struct.unpack(">L", sub_value)
    return AssociateAccept(results, maximum_length)


def encode_associate_reject(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 permanent / 2 transient, source, reason/diagnostic."""
    return header(A_ASSOCIATE_RJ, 4) + bytes((0, result, source, reason))


def encode_release_response() -> bytes:
    """An A-RELEASE-RP."""
    return header(A_RELEASE_RP, 4) + bytes(4)


def encode_abort(source: int, reason: int) -> bytes:
    """An A-ABORT (PS3.8 9.3.8)."""
    return header(A_ABORT, 4) + bytes((0, 0, source, reason))


def encode_p_data(context_id: int, is_command: bool, payload: bytes | memoryview, maximum_length: int) -> bytes:
    """``payload`` (a command set or a data set) as P-DATA-TF PDUs of at most ``maximum_length`` bytes
    (0: no limit), one PDV each, the last marked as the last fragment."""
    limit = len(payload) if maximum_length <= 0 else max(1, maximum_length - PDV_HEADER_LENGTH)
    control = 0x01 if is_command else 0x00
    view = memoryview(payload)
    chunks = []
    offset = 0
    while True:
        fragment = view[offset:offset + limit]
        offset += len(fragment)
        last = offset >= len(view)
        pdv_length = len(fragment) + 2
        chunks.append(struct.pack(">BBLLBB", P_DATA_TF, 0, pdv_length + 4, pdv_length, context_id,
                                  control | (0x02 if last else 0x00)))
        chunks.append(bytes(fragment))
        if last:
            return b"".join(chunks)


@dataclass(frozen=True)
class PresentationDataValue:
    """One PDV of a P-DATA-TF: a fragment of a command set or of a data set."""

    context_id: int
    is_command: bool
    is_last: bool
    data: bytes


def parse_p_data(body: bytes) -> list[PresentationDataValue]:
    """The PDV items of a P-DATA-TF body; raises :class:`PduError`."""
    values = []
    offset = 0
    while offset < len(body):
        if offset + PDV_HEADER_LENGTH > len(body):
            raise PduError("truncated PDV item")
        (length,) = struct.unpack_from(">L", body, offset)
        if length < 2 or offset + 4 + length > len(body):
            raise PduError("PDV item length does not fit its PDU")
        control = body[offset + 5]
        values.append(PresentationDataValue(body[offset + 4], bool(control & 0x01), bool(control & 0x02),
                                            body[offset + 6:offset + 4 + length]))
        offset += 4 + length
    return values
