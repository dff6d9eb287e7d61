"""One accepted association, from A-ASSOCIATE-RQ to release or abort, in the thread that serves it.

Why not pynetdicom's acceptor: it runs two threads per association that poll their queues with
``time.sleep`` (every 0.1-1 ms) and passes each PDU through several queues and a state machine. Measured
here, that machinery cost 22 ms of CPU for an association yielding 20 worklist responses, and with 50
modalities connected the polling threads fought over the interpreter lock: about 14 queries/s on two
cores. This acceptor blocks in ``recv`` instead of polling, keeps one thread per association, encodes
the responses of a C-FIND into as few writes as it can, and hands each DIMSE request to a handler bound
by SOP class and command (the pynetdicom shape: small handlers yielding ``(status, data set)``).
pynetdicom stays the broker's association requestor (SCU), where none of this matters.

Negotiation follows PS3.8: of the transfer syntaxes a context proposes, the first in the service's own
order of preference is accepted (Explicit VR Little Endian before Implicit, as the conformance statement
says), whatever the requestor's order; an association none of whose contexts can be accepted is rejected
(A-ASSOCIATE-RJ rejected-permanent, service-user, no reason given: PS3.8 has no more specific reason,
and DCMTK's DcmSCP sends the same), so that it holds no association slot. Role selection is answered
for the SOP classes whose roles the service allows; asynchronous operations, extended negotiation and
user identity are not answered, so their defaults hold.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from broker.dicom import dimse, pdu
from broker.dicom.access import PLAIN, Channel
from broker.dicom.transport import quickack
from broker.dicom.wellformed import MalformedDataSet
from broker.dicom_json import JsonDataset

log = structlog.get_logger(__name__)

# A-ASSOCIATE-RJ (result, source, reason/diagnostic): PS3.8 table 9-21
REJECT_NO_REASON = (0x01, 0x01, 0x01)
# None of the proposed presentation contexts can be accepted: PS3.8 names no reason for it; no-reason-given
# is what DCMTK's DcmSCP sends (and dcm4che's constants offer).
REJECT_NO_ACCEPTABLE_CONTEXT = REJECT_NO_REASON
REJECT_APPLICATION_CONTEXT_NOT_SUPPORTED = (0x01, 0x01, 0x02)
REJECT_CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
REJECT_PROTOCOL_VERSION_NOT_SUPPORTED = (0x01, 0x02, 0x02)
REJECT_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
Reject = tuple[int, int, int]

# Responses are written once this much is waiting, or once the oldest has waited this long, so a
# query answered from one page goes out in one or two writes and a slow one still streams.
_FLUSH_BYTES = 16384
_FLUSH_SECONDS = 0.002
# A C-CANCEL is looked for at most this often while responses are produced.
_CANCEL_CHECK_SECONDS = 0.002
_RECEIVE_BYTES = 65536
# Room in a P-DATA-TF beyond the largest message: PDV headers and a command set.
_PDU_OVERHEAD = 65536
# How long to wait for the peer to close after A-RELEASE-RP, A-ASSOCIATE-RJ or A-ABORT (ARTIM).
_LINGER_SECONDS = 5.0


@dataclass(frozen=True)
class AcceptedContext:
    """A presentation context accepted on this association."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str

    @property
    def is_implicit_vr(self) -> bool:
        return self.transfer_syntax == ImplicitVRLittleEndian


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of an association."""

    calling_ae_title: str
    called_ae_title: str
    address: str
    port: int
    implementation_version_name: str = ""


class Request:
    """A DIMSE request as a handler sees it (the counterpart of pynetdicom's ``Event``)."""

    def __init__(self, peer: Peer, context: AcceptedContext, message: dimse.Message,
                 is_cancelled: Callable[[], bool], data_set: Dataset | None = None) -> None:
        self.peer = peer
        self.context = context
        self.command = message.command
        self.data_set_bytes = message.data_set or b""
        """The data set as it came on the wire (what an audit record of a query keeps)."""
        self._data_set = data_set
        self._is_cancelled = is_cancelled

    def data_set(self) -> Dataset:
        """The request's data set (identifier, attribute list, event or action information), empty when
        none came. It was checked and decoded completely before the handler was called: a request whose
        data set cannot be decoded never reaches a handler (see ``Association._dispatch``)."""
        return Dataset() if self._data_set is None else self._data_set

    @property
    def is_cancelled(self) -> bool:
        """A C-CANCEL for this request has arrived (checked between responses)."""
        return self._is_cancelled()


Response = tuple[int | Dataset, Dataset | JsonDataset | None]
"""What a handler yields: a status (or a status data set with Error Comment and the like) and the data
set to send with it, if any, as a pydicom Dataset or as DICOM JSON (encoded directly, faster)."""
Handler = Callable[[Request], Iterable[Response]]


@dataclass
class ServiceSet:
    """The handlers bound to SOP classes and commands, and the roles a requestor may take per class."""

    handlers: dict[tuple[str, int], Handler] = field(default_factory=dict)
    transfer_syntaxes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # SOP class -> (requestor may be SCU, requestor may be SCP)
    requestor_roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)

    def bind(self, sop_class_uid: str, command_field: int, handler: Handler,
             transfer_syntaxes: Iterable[str], requestor_roles: tuple[bool, bool] = (True, False)) -> None:
        """Serve ``command_field`` requests of ``sop_class_uid`` with ``handler``."""
        self.handlers[(sop_class_uid, command_field)] = handler
        self.transfer_syntaxes[sop_class_uid] = tuple(transfer_syntaxes)
        self.requestor_roles[sop_class_uid] = requestor_roles

    def negotiate(self, request: pdu.AssociateRequest) -> tuple[list[pdu.ContextResult], list[pdu.RoleSelection]]:
        """The answer to each proposed context (our preferred transfer syntax among those it proposes),
        and the role selection replies."""
        results = []
        for proposed in request.contexts:
            supported = self.transfer_syntaxes.get(proposed.abstract_syntax)
            if supported is None:
                results.append(pdu.ContextResult(proposed.context_id, pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED,
                                                 ImplicitVRLittleEndian))
                continue
            chosen = next((ts for ts in supported if ts in proposed.transfer_syntaxes), None)
            if chosen is None:
                results.append(pdu.ContextResult(proposed.context_id, pdu.TRANSFER_SYNTAXES_NOT_SUPPORTED,
                                                 ImplicitVRLittleEndian))
            else:
                results.append(pdu.ContextResult(proposed.context_id, pdu.ACCEPTANCE, chosen))
        roles = []
        for uid, asked in request.roles.items():
            if uid in self.requestor_roles:
                may_scu, may_scp = self.requestor_roles[uid]
                roles.append(pdu.RoleSelection(uid, asked.scu_role and may_scu, asked.scp_role and may_scp))
        return results, roles


class AssociationHost(Protocol):
    """What an association needs from the server that accepted it."""

    services: ServiceSet
    ae_title: str
    maximum_length: int
    implementation_class_uid: str
    implementation_version_name: str
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    max_message_bytes: int
    quickack: bool

    def admit(self, request: pdu.AssociateRequest, address: str, channel: Channel) -> Reject | None:
        """None to accept, or the A-ASSOCIATE-RJ to send (the host logs why)."""

    def leave(self) -> None:
        """The association no longer counts against the limit."""


class _Closed(Exception):
    """The peer closed or aborted, or the association was aborted; the thread ends."""


class Association:
    """Serves one TCP connection; :meth:`run` returns when the association is over.

    ``sock`` may be an :class:`ssl.SSLSocket` whose handshake is done (``channel`` then says so and
    names the client's certificate): reads, writes and timeouts are the same calls; only looking for
    a waiting C-CANCEL must first ask the TLS layer, which may hold decrypted bytes the kernel no
    longer shows as readable.
    """

    def __init__(self, sock: socket.socket, address: tuple[str, int], host: AssociationHost,
                 channel: Channel = PLAIN) -> None:
        self.sock = sock
        self.address = address
        self.host = host
        self.channel = channel
        self.peer = Peer("", "", address[0], address[1])
        self.contexts: dict[int, AcceptedContext] = {}
        self.peer_maximum_length = 0
        self._assembler = dimse.MessageAssembler(host.max_message_bytes)
        self._backlog: deque[dimse.Message] = deque()
        self._cancelled: set[int] = set()
        self._admitted = False
        self._release_requested = False
        self._received = bytearray()  # read from the socket, not yet parsed
        self._cancel_checked = 0.0
        self._started = time.monotonic()  # the A-ASSOCIATE-RQ is due within the ACSE timeout of this
        self._message_deadline = 0.0  # by when the DIMSE message under way must be complete
        self._pdu_deadline = 0.0  # by when the PDU being read must be complete

    # --- the life of the association ----------------------------------------------------------------
    def run(self) -> None:
        # every event of this thread (pydicom's warnings too) names the peer, and the calling AE once known
        structlog.contextvars.bind_contextvars(peer=self.address[0])
        try:
            if self._negotiate():
                self._serve()
        except _Closed:
            pass
        except TimeoutError:
            log.info("dicom.association_timeout", calling_ae=self.peer.calling_ae_title, peer=self.address[0])
            self._abort(pdu.REASON_NOT_SPECIFIED)
        except dimse.MessageTooLarge as exc:
            log.warning("dicom.message_too_large", calling_ae=self.peer.calling_ae_title, peer=self.address[0],
                        bytes=exc.size, limit=exc.limit)
            self._abort(exc.reason)
        except pdu.PduError as exc:
            log.warning("dicom.protocol_error", calling_ae=self.peer.calling_ae_title, peer=self.address[0],
                        error=str(exc))
            self._abort(exc.reason)
        except OSError as exc:
            log.info("dicom.connection_lost", calling_ae=self.peer.calling_ae_title, peer=self.address[0],
                     error=exc.strerror or type(exc).__name__)
        except Exception:
            log.exception("dicom.association_failed", calling_ae=self.peer.calling_ae_title, peer=self.address[0])
            self._abort(pdu.REASON_NOT_SPECIFIED)
        finally:
            self._leave()
            _close(self.sock)
            structlog.contextvars.unbind_contextvars("peer", "calling_ae")

    def _negotiate(self) -> bool:
        # The whole request within the ACSE timeout of the connection, however it is trickled.
        pdu_type, body = self._read_pdu(self._started + self.host.acse_timeout)
        if pdu_type != pdu.A_ASSOCIATE_RQ:
            raise pdu.PduError(f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ", pdu.REASON_UNEXPECTED_PDU)
        request = pdu.parse_associate_request(body)
        self.peer = Peer(request.calling_ae_title, request.called_ae_title, self.address[0], self.address[1],
                         request.implementation_version_name)
        structlog.contextvars.bind_contextvars(calling_ae=request.calling_ae_title)
        reject: Reject | None
        results, roles = self.host.services.negotiate(request)
        if not request.protocol_version & 0x0001:
            reject = REJECT_PROTOCOL_VERSION_NOT_SUPPORTED
        elif request.application_context_name != pdu.DICOM_APPLICATION_CONTEXT:
            reject = REJECT_APPLICATION_CONTEXT_NOT_SUPPORTED
        else:
            reject = self.host.admit(request, self.address[0], self.channel)
            if reject is None and not any(r.result == pdu.ACCEPTANCE for r in results):
                # Admitted (the allow-list says who it is) but nothing to serve: out of the count again.
                self.host.leave()
                log.warning("dicom.association_rejected", calling_ae=self.peer.calling_ae_title,
                            peer=self.address[0], reason="no acceptable presentation context",
                            proposed=sorted({c.abstract_syntax for c in request.contexts})[:8])
                reject = REJECT_NO_ACCEPTABLE_CONTEXT
        if reject is not None:
            self._send(pdu.encode_associate_reject(*reject))
            self._linger()
            return False
        self._admitted = True
        self.contexts = {
            r.context_id: AcceptedContext(r.context_id, p.abstract_syntax, r.transfer_syntax)
            for r, p in zip(results, request.contexts, strict=True) if r.result == pdu.ACCEPTANCE}
        self.peer_maximum_length = request.maximum_length
        self._send(pdu.encode_associate_accept(request, results, roles, self.host.maximum_length,
                                               self.host.implementation_class_uid,
                                               self.host.implementation_version_name))
        log.debug("dicom.association", calling_ae=self.peer.calling_ae_title, peer=self.address[0],
                  contexts=len(self.contexts))
        return True

    def _serve(self) -> None:
        while True:
            while self._backlog:
                self._dispatch(self._backlog.popleft())
            if self._release_requested:
                self._release()
                return
            self._receive()

    def _receive(self) -> None:
        """Read one PDU and act on it; complete DIMSE messages are queued in the backlog.

        Between messages the peer may stay silent for the network timeout; a PDU, once its first byte
        is here, and a DIMSE message, once its first PDU is, must be complete within the DIMSE timeout
        (a peer trickling bytes does not hold the association, and its thread, longer than that)."""
        if self._assembler.in_progress:
            pdu_type, body = self._read_pdu(self._message_deadline)
        else:
            pdu_type, body = self._read_pdu(time.monotonic() + self.host.network_timeout,
                                            complete_within=self.host.dimse_timeout)
        if pdu_type == pdu.P_DATA_TF:
            starting = not self._assembler.in_progress
            messages = self._assembler.add(pdu.parse_p_data(body))
            if starting and self._assembler.in_progress:
                self._message_deadline = self._pdu_deadline
            for message in messages:
                if message.command_field == dimse.C_CANCEL_RQ:
                    self._cancelled.add(int(message.command.get("MessageIDBeingRespondedTo", -1)))
                else:
                    self._backlog.append(message)
        elif pdu_type == pdu.A_RELEASE_RQ:
            self._release_requested = True
        elif pdu_type == pdu.A_ABORT:
            log.info("dicom.association_aborted", calling_ae=self.peer.calling_ae_title, peer=self.address[0])
            raise _Closed
        elif pdu_type in pdu.PDU_TYPES:
            raise pdu.PduError(f"unexpected PDU type 0x{pdu_type:02X}", pdu.REASON_UNEXPECTED_PDU)
        else:
            raise pdu.PduError(f"unrecognized PDU type 0x{pdu_type:02X}", pdu.REASON_UNRECOGNIZED_PDU)

    def _release(self) -> None:
        # Out of the count before the A-RELEASE-RP: a modality that associates again the moment it has
        # the RP must find its place free, not be rejected for its own previous association.
        self._leave()
        self._send(pdu.encode_release_response())
        self._linger()

    # --- DIMSE --------------------------------------------------------------------------------------
    def _dispatch(self, message: dimse.Message) -> None:
        context = self.contexts.get(message.context_id)
        if context is None:
            raise pdu.PduError(f"message on presentation context {message.context_id}, which was not accepted",
                               pdu.REASON_INVALID_PDU_PARAMETER)
        field_ = message.command_field
        if field_ & 0x8000:  # a response where a request was expected: nothing we asked for
            log.warning("dicom.unexpected_response", calling_ae=self.peer.calling_ae_title, command=hex(field_))
            return
        sop_class = str(message.command.get("AffectedSOPClassUID") or message.command.get("RequestedSOPClassUID")
                        or context.abstract_syntax)
        handler = self.host.services.handlers.get((context.abstract_syntax, field_))
        message_id = message.message_id
        if handler is None:
            status = dimse.SOP_CLASS_NOT_SUPPORTED if sop_class != context.abstract_syntax \
                else dimse.UNRECOGNIZED_OPERATION
            self._write_responses(Request(self.peer, context, message, lambda: False), [(status, None)])
            return
        data_set = None
        if message.data_set is not None:
            try:
                data_set = dimse.decode_data_set(message.data_set, context.is_implicit_vr)
            except MalformedDataSet as exc:
                self._refuse_data_set(Request(self.peer, context, message, lambda: False), exc)
                return
        request = Request(self.peer, context, message, lambda: self._is_cancelled(message_id), data_set)
        try:
            self._write_responses(request, handler(request))
        finally:
            self._cancelled.discard(message_id)

    def _refuse_data_set(self, request: Request, error: MalformedDataSet) -> None:
        """Answer a request whose data set cannot be decoded, without calling its handler: C-FIND with
        A900 (Identifier does not match SOP Class, Offending Element when known), the others with 0110
        (Processing failure); both with an Error Comment saying what is wrong. Logged; the association
        goes on."""
        field_ = int(request.command.CommandField)
        log.warning("dicom.bad_data_set", calling_ae=self.peer.calling_ae_title, peer=self.address[0],
                    command=hex(field_), error=str(error))
        status = Dataset()
        what = _DATA_SET_NAMES.get(field_, "data set")
        status.ErrorComment = f"undecodable {what}: {error}"[:64]
        if field_ == dimse.C_FIND_RQ:
            status.Status = dimse.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
            if error.tag is not None:
                status.OffendingElement = [error.tag]
        else:
            status.Status = dimse.PROCESSING_FAILURE
        self._write_responses(request, [(status, None)])

    def _is_cancelled(self, message_id: int) -> bool:
        # Looking at the socket is a system call, and under load every system call can cost a thread
        # its turn at the interpreter lock: look at most every _CANCEL_CHECK_SECONDS.
        now = time.monotonic()
        if message_id not in self._cancelled and now - self._cancel_checked >= _CANCEL_CHECK_SECONDS:
            self._cancel_checked = now
            if self._readable():
                self._receive()
        return message_id in self._cancelled

    def _readable(self) -> bool:
        if len(self._received) >= pdu.PDU_HEADER_LENGTH:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():  # decrypted, not yet read
            return True
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def _write_responses(self, request: Request, responses: Iterable[Response]) -> None:
        """Encode and send each response; pending ones are buffered briefly into larger writes."""
        buffered: list[bytes] = []
        size = 0
        since = 0.0
        for status, data_set in _checked(responses):
            chunk = self._encode_response(request, status, data_set)
            if not buffered:
                since = time.monotonic()
            buffered.append(chunk)
            size += len(chunk)
            if size >= _FLUSH_BYTES or time.monotonic() - since >= _FLUSH_SECONDS:
                self._send(b"".join(buffered))
                buffered, size = [], 0
        if buffered:
            self._send(b"".join(buffered))

    def _encode_response(self, request: Request, status: int | Dataset,
                         data_set: Dataset | JsonDataset | None) -> bytes:
        command = request.command
        request_field = int(command.CommandField)
        elements: dict[str, Any] = {
            "AffectedSOPClassUID": str(command.get("AffectedSOPClassUID")
                                       or command.get("RequestedSOPClassUID") or request.context.abstract_syntax),
            "CommandField": request_field | 0x8000,
            "MessageIDBeingRespondedTo": int(command.get("MessageID", 0)),
            "CommandDataSetType": dimse.NO_DATA_SET if data_set is None else dimse.DATA_SET_PRESENT,
        }
        if request_field in _NORMALIZED_REQUESTS:
            elements["AffectedSOPInstanceUID"] = command.get("AffectedSOPInstanceUID") \
                or command.get("RequestedSOPInstanceUID")
            if request_field == dimse.N_EVENT_REPORT_RQ:
                elements["EventTypeID"] = command.get("EventTypeID")
            if request_field == dimse.N_ACTION_RQ:
                elements["ActionTypeID"] = command.get("ActionTypeID")
        elements.update(dimse.status_elements(status))
        if isinstance(status, Dataset) and "AffectedSOPInstanceUID" in status:  # assigned by the SCP
            elements["AffectedSOPInstanceUID"] = str(status.AffectedSOPInstanceUID)
        out = pdu.encode_p_data(request.context.context_id, True, dimse.encode_command(elements),
                                self.peer_maximum_length)
        if data_set is None:
            return out
        payload = dimse.encode_data_set(data_set, request.context.is_implicit_vr)
        return out + pdu.encode_p_data(request.context.context_id, False, payload, self.peer_maximum_length)

    # --- the wire -----------------------------------------------------------------------------------
    def _read_pdu(self, deadline: float, complete_within: float | None = None) -> tuple[int, bytes]:
        """One PDU, whose first byte must arrive by ``deadline`` (``time.monotonic``), and all of it by
        then too or, given ``complete_within``, within that many seconds of its first byte."""
        if not self._received:
            self._read_exact(1, deadline, consume=False)
        if complete_within is not None:
            deadline = time.monotonic() + complete_within
        self._pdu_deadline = deadline
        header = self._read_exact(pdu.PDU_HEADER_LENGTH, deadline)
        pdu_type, length = pdu.parse_header(header)
        limit = self.host.maximum_length
        if pdu_type == pdu.P_DATA_TF and limit and length > limit:
            raise pdu.PduError(f"P-DATA-TF of {length} bytes, over the negotiated {limit}",
                               pdu.REASON_INVALID_PDU_PARAMETER)
        if pdu_type == pdu.P_DATA_TF and length > self._assembler.maximum_bytes + _PDU_OVERHEAD:
            # not read at all: with BROKER_DICOM_MAX_PDU 0 one PDU could otherwise be any size
            raise dimse.MessageTooLarge(length, self._assembler.maximum_bytes)
        if pdu_type != pdu.P_DATA_TF and length > 1 << 20:
            raise pdu.PduError(f"PDU of {length} bytes", pdu.REASON_INVALID_PDU_PARAMETER)
        return pdu_type, self._read_exact(length, deadline)

    def _read_exact(self, count: int, deadline: float, consume: bool = True) -> bytes:
        """``count`` bytes by ``deadline``, from what an earlier ``recv`` brought or from the socket; one
        ``recv`` takes whatever has arrived (often a whole request), not one PDU header at a time.
        Raises TimeoutError at the deadline, however many bytes have come by then."""
        received = self._received
        while len(received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            if self.host.quickack:
                quickack(self.sock)
            data = self.sock.recv(max(_RECEIVE_BYTES, count - len(received)))
            if not data:
                if received or self._admitted:
                    log.info("dicom.connection_closed", calling_ae=self.peer.calling_ae_title, peer=self.address[0])
                raise _Closed
            received += data
        if not consume:
            return b""
        out = bytes(received[:count])
        del received[:count]
        return out

    def _send(self, data: bytes) -> None:
        self.sock.settimeout(self.host.dimse_timeout)  # a read may have left a deadline's remainder
        self.sock.sendall(data)
        if self.host.quickack:
            quickack(self.sock)

    def _abort(self, reason: int) -> None:
        with contextlib.suppress(OSError):
            self._send(pdu.encode_abort(pdu.ABORT_SOURCE_SERVICE_PROVIDER, reason))

    def _linger(self) -> None:
        """Wait (briefly) for the peer to close first, as PS3.8 7.2 / 7.3 expect of an acceptor."""
        with contextlib.suppress(OSError):
            self.sock.settimeout(_LINGER_SECONDS)
            while self.sock.recv(4096):
                pass

    def _leave(self) -> None:
        if self._admitted:
            self._admitted = False
            self.host.leave()


# What the data set of each request is called in PS3.7 (for the Error Comment of an undecodable one).
_DATA_SET_NAMES = {dimse.C_FIND_RQ: "identifier", dimse.N_CREATE_RQ: "attribute list",
                   dimse.N_SET_RQ: "modification list", dimse.N_ACTION_RQ: "action information",
                   dimse.N_EVENT_REPORT_RQ: "event information"}
_NORMALIZED_REQUESTS = frozenset({dimse.N_EVENT_REPORT_RQ, dimse.N_GET_RQ, dimse.N_SET_RQ, dimse.N_ACTION_RQ,
                                  dimse.N_CREATE_RQ, dimse.N_DELETE_RQ})


def _close(sock: socket.socket) -> None:
    """Close the connection; on TLS, send close_notify first without waiting for the peer's (the
    socket is made non-blocking, so ``unwrap`` returns, or raises, at once)."""
    if isinstance(sock, ssl.SSLSocket):
        with contextlib.suppress(OSError, ValueError):
            sock.settimeout(0)
            sock.unwrap()
    with contextlib.suppress(OSError):
        sock.close()


def _checked(responses: Iterable[Response]) -> Iterator[Response]:
    """The handler's responses; a handler that raises answers 0110 rather than leaving the peer waiting."""
    try:
        yield from responses
    except (_Closed, OSError, pdu.PduError):  # the association's own reads, made while checking for C-CANCEL
        raise
    except Exception as exc:
        log.exception("dicom.handler_failed")
        status = Dataset()
        status.Status = dimse.PROCESSING_FAILURE
        status.ErrorComment = f"internal error ({type(exc).__name__})"[:64]
        yield status, None
