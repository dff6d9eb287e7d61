"""The broker's DICOM application entity: which services it offers and how associations are admitted.

Services (SCP), in Explicit and Implicit VR Little Endian: Verification, Modality Worklist Information
Model - FIND and, given the workflow services, Modality Performed Procedure Step (N-CREATE, N-SET),
Instance Availability Notification (N-CREATE) and Storage Commitment Push Model results
(N-EVENT-REPORT on associations the archive opens, where it takes the SCP role).

Associations beyond ``dicom_max_associations`` get A-ASSOCIATE-RJ (rejected-transient,
service-provider presentation, local limit exceeded); callers outside ``dicom_allowed_callers``, and
AE titles bound to a certificate they did not present (``dicom_tls_ae_certificates``), get
A-ASSOCIATE-RJ (rejected-permanent, service-user, calling AE title not recognized). Both are logged.
Each association runs in a thread of its own (:mod:`broker.dicom.association`).

One server listens on one port: the plain port, or given an ``ssl.SSLContext`` the TLS port (PS3.15
Annex B), where each connection's handshake runs in its association's thread. The plain and the TLS
server of a process share one :class:`AssociationCount` (:mod:`broker.dicom.listeners`). A failed
handshake is logged (``dicom.tls_handshake_failed``, peer and reason) and audited; the listener goes on.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator
from functools import partial
from importlib.metadata import version
from typing import Any

import structlog
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    InstanceAvailabilityNotification,
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    StorageCommitmentPushModel,
    Verification,
)
from sqlalchemy import Engine

from broker.audit.trail import AuditWriter
from broker.config import Settings
from broker.dicom import dimse, ian_scp, mpps_scp, pdu, stgcmt_scp, ups_scp
from broker.dicom.access import PLAIN, CallerPolicy, Channel
from broker.dicom.association import (
    REJECT_CALLING_AE_NOT_RECOGNIZED,
    REJECT_LOCAL_LIMIT_EXCEEDED,
    Association,
    Handler,
    Reject,
    Request,
    Response,
    ServiceSet,
)
from broker.dicom.audit_hooks import DicomAudit
from broker.dicom.mwl_scp import handle_find
from broker.dicom.transport import ClosedBeforeHandshake, tls_handshake, tune_accepted
from broker.dicom.workflow import Workflow
from broker.domain.ups_view import UPS_EVENT, UPS_PULL, UPS_PUSH, UPS_QUERY, UPS_WATCH
from broker.mwl.finder import WorklistFinder
from broker.mwl.matching import WorklistOptions
from broker.tls import handshake_failure, peer_certificate

log = structlog.get_logger(__name__)

TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# (0002,0013), at most 16 characters.
IMPLEMENTATION_VERSION_NAME = "WLBROKER_" + version("worklist-broker").replace(".", "")[:7]
# (0002,0012): the broker has no UID root of its own, so its implementation UID is derived, stably,
# under pydicom's root (which pydicom offers for generated UIDs).
IMPLEMENTATION_CLASS_UID = str(generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["worklist-broker"]))
# Connections waiting to be accepted: a burst of 50 modalities must not overflow it (socketserver's
# default of 5 dropped hundreds of connection attempts per benchmark series into TCP retransmits).
LISTEN_BACKLOG = 256


class AssociationCount:
    """The associations admitted and not yet ended, against ``dicom_max_associations``.

    Per process by default; given a ``multiprocessing.Value('i')``, shared by the acceptor processes of
    ``dicom_processes`` so that the limit holds for the port, not for each process.
    """

    def __init__(self, shared: Any | None = None) -> None:
        self._counter = shared if shared is not None else _ThreadCounter()

    def try_enter(self, limit: int) -> bool:
        """Count one more association unless ``limit`` are open already."""
        with self._counter.get_lock():
            if self._counter.value >= limit:
                return False
            self._counter.value += 1
            return True

    def leave(self) -> None:
        with self._counter.get_lock():
            self._counter.value -= 1


class _ThreadCounter:
    """What :class:`AssociationCount` uses of a ``multiprocessing.Value``, for one process's threads."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self._lock


def worklist_options(settings: Settings) -> WorklistOptions:
    """The matching options the settings ask for (the station restriction is set per association)."""
    return WorklistOptions(pn_case_insensitive=settings.mwl_pn_case_insensitive,
                           hidden_statuses=settings.hidden_statuses, page_size=settings.mwl_page_size)


class DicomServer:
    """The running DICOM listener; :meth:`start` returns once it accepts connections."""

    def __init__(self, settings: Settings, engine: Engine, workflow: Workflow | None = None, *,
                 count: AssociationCount | None = None, reuse_port: bool = False, port: int | None = None,
                 tls: ssl.SSLContext | None = None, audit: AuditWriter | None = None) -> None:
        """``engine`` serves the worklist (a reading engine); ``workflow`` (its own read-write engine)
        the MPPS, IAN and commitment services, which are offered only when it is given. ``count`` and
        ``reuse_port``: shared with the other port and the other acceptor processes (``dicom_processes``).
        ``port``: by default ``dicom_port``; with ``tls`` (a context of :func:`broker.tls.server_context`)
        every connection is TLS. ``audit``: where queries and refusals are recorded (None: not recorded)."""
        self.settings = settings
        self.count = count or AssociationCount()
        self.reuse_port = reuse_port
        self.configured_port = settings.dicom_port if port is None else port
        self.tls = tls
        self.audit = DicomAudit(audit, settings.ae_title) if audit is not None else None
        self.workflow = workflow
        self.ae_title = settings.ae_title
        self.maximum_length = settings.dicom_max_pdu
        self.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        self.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        self.acse_timeout = settings.dicom_acse_timeout
        self.dimse_timeout = settings.dicom_dimse_timeout
        self.network_timeout = settings.dicom_network_timeout
        self.max_message_bytes = settings.dicom_max_message_bytes
        self.quickack = settings.dicom_tcp_quickack
        self.policy = CallerPolicy.from_pairs(settings.allowed_callers, settings.ae_certificates)
        self.finder = WorklistFinder(engine, worklist_options(settings))
        self.own_items_only = settings.mwl_station_sees_own_items
        self.services = self.bind_services()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()

    def bind_services(self) -> ServiceSet:
        """The handlers of each SOP class and command this AE serves."""
        services = ServiceSet()
        services.bind(Verification, dimse.C_ECHO_RQ, _on_echo, TRANSFER_SYNTAXES)
        services.bind(ModalityWorklistInformationFind, dimse.C_FIND_RQ, self._audited(self._on_find),
                      TRANSFER_SYNTAXES)
        workflow = self.workflow
        if workflow is not None:
            services.bind(ModalityPerformedProcedureStep, dimse.N_CREATE_RQ,
                          lambda request: mpps_scp.handle_n_create(request, workflow.mpps), TRANSFER_SYNTAXES)
            services.bind(ModalityPerformedProcedureStep, dimse.N_SET_RQ,
                          lambda request: mpps_scp.handle_n_set(request, workflow.mpps), TRANSFER_SYNTAXES)
            services.bind(InstanceAvailabilityNotification, dimse.N_CREATE_RQ,
                          lambda request: ian_scp.handle_n_create(request, workflow.ian), TRANSFER_SYNTAXES)
            self._bind_ups(services, workflow)
            # The archive reports commitment results as the SCP of the class (role selection).
            services.bind(StorageCommitmentPushModel, dimse.N_EVENT_REPORT_RQ,
                          lambda request: stgcmt_scp.handle_n_event_report(request, workflow.commitment),
                          TRANSFER_SYNTAXES, requestor_roles=(True, True))
        return services

    def _bind_ups(self, services: ServiceSet, workflow: Workflow) -> None:
        """The five UPS SOP classes (PS3.4 CC): N-SET / N-ACTION / N-GET arrive on the Push, Pull and
        Watch contexts (the request names the Push class), C-FIND on Pull, Watch and Query."""
        ups = workflow.ups
        operations = {
            dimse.N_CREATE_RQ: (ups_scp.handle_n_create, (UPS_PUSH,)),
            dimse.N_SET_RQ: (ups_scp.handle_n_set, (UPS_PUSH, UPS_PULL, UPS_WATCH)),
            dimse.N_GET_RQ: (ups_scp.handle_n_get, (UPS_PUSH, UPS_PULL, UPS_WATCH, UPS_QUERY)),
            dimse.N_ACTION_RQ: (ups_scp.handle_n_action, (UPS_PUSH, UPS_PULL, UPS_WATCH)),
            dimse.C_FIND_RQ: (ups_scp.handle_find, (UPS_PULL, UPS_WATCH, UPS_QUERY)),
        }
        for command, (handler, classes) in operations.items():
            bound: Handler = partial(handler, ups=ups)
            if command == dimse.C_FIND_RQ:
                bound = self._audited(bound)
            for sop_class in classes:
                services.bind(sop_class, command, bound, TRANSFER_SYNTAXES)
        # Event: the broker sends the N-EVENT-REPORTs; an SCU that proposes the class is accepted.
        services.bind(UPS_EVENT, dimse.N_EVENT_REPORT_RQ, _no_event_reports_here, TRANSFER_SYNTAXES)

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._listener is not None, "not started"
        return int(self._listener.getsockname()[1])

    def _audited(self, handler: Handler) -> Handler:
        """``handler`` (a C-FIND), with a Query audit record of each request when recording."""
        audit = self.audit
        if audit is None:
            return handler

        def audited(request: Request) -> Iterable[Response]:
            audit.query(request)
            return handler(request)

        return audited

    def start(self) -> None:
        """Bind and accept in a background thread; raises OSError when the port cannot be bound."""
        listener = socket.create_server((self.settings.dicom_host, self.configured_port),
                                        backlog=LISTEN_BACKLOG, reuse_port=self.reuse_port)
        listener.settimeout(0.5)  # so that stop() is noticed
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-acceptor", daemon=True)
        self._thread.start()
        log.info("dicom.started", port=self.port, tls=self.tls is not None, ae_title=self.ae_title,
                 max_associations=self.settings.dicom_max_associations,
                 allow_list=sorted(self.policy.entries) or None, quickack=self.quickack)

    def stop(self) -> None:
        """Stop accepting and close the connections still open (their threads then end)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            open_connections = list(self._connections)
        for connection in open_connections:
            if self.tls is None:
                with contextlib.suppress(OSError):
                    connection.sendall(pdu.encode_abort(pdu.ABORT_SOURCE_SERVICE_PROVIDER,
                                                        pdu.REASON_NOT_SPECIFIED))
            # On TLS no A-ABORT: a record written from this thread would race the association's own
            # writes on one TLS session; closing TCP ends the association (the socket class's shutdown,
            # as SSLSocket.shutdown would drop the TLS state under the association's thread).
            with contextlib.suppress(OSError):
                socket.socket.shutdown(connection, socket.SHUT_RDWR)

    # --- accepting --------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                connection, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.warning("dicom.accept_failed", error=exc.strerror or type(exc).__name__)
                continue
            tune_accepted(connection, self.quickack)
            with self._lock:
                self._connections.add(connection)
            threading.Thread(target=self._serve, args=(connection, address), name=f"dicom-{address[0]}",
                             daemon=True).start()

    def _serve(self, connection: socket.socket, address: tuple[str, int]) -> None:
        kept = [connection]  # what _connections holds for this connection (the TLS socket once wrapped)
        try:
            channel = PLAIN
            if self.tls is not None:
                secured = self._handshake(connection, address, kept)
                if secured is None:
                    return
                connection, channel = secured, Channel(True, peer_certificate(secured))
            Association(connection, address, self, channel).run()
        finally:
            with self._lock:
                self._connections.discard(kept[-1])

    def _handshake(self, connection: socket.socket, address: tuple[str, int],
                   kept: list[socket.socket]) -> ssl.SSLSocket | None:
        """The TLS handshake within ``tls_handshake_timeout``; None (logged, audited, closed) if it fails."""
        assert self.tls is not None

        def wrapped(secured: ssl.SSLSocket) -> None:
            with self._lock:
                self._connections.discard(connection)
                self._connections.add(secured)
            kept.append(secured)

        try:
            return tls_handshake(connection, self.tls, self.settings.tls_handshake_timeout, wrapped)
        except ClosedBeforeHandshake:
            log.info("dicom.closed_before_handshake", peer=address[0])
        except Exception as exc:  # whatever it was, this connection only: the listener goes on
            reason = handshake_failure(exc)
            log.warning("dicom.tls_handshake_failed", peer=address[0], port=self.port, reason=reason)
            if self.audit is not None:
                self.audit.handshake_failed(address[0], reason, self.port)
        with contextlib.suppress(OSError):
            kept[-1].close()
        return None

    def admit(self, request: pdu.AssociateRequest, address: str, channel: Channel = PLAIN) -> Reject | None:
        """Accept (counting the association against the limit) or say which rejection to send."""
        calling = request.calling_ae_title
        refusal = self.policy.refusal(calling, address, channel)
        if refusal is not None:
            log.warning("dicom.association_refused", calling_ae=calling, peer=address, reason=refusal,
                        tls=channel.tls)
            if self.audit is not None:
                self.audit.refused(calling, address, refusal, self.port)
            return REJECT_CALLING_AE_NOT_RECOGNIZED
        if not self.count.try_enter(self.settings.dicom_max_associations):
            log.warning("dicom.association_rejected", calling_ae=calling, peer=address,
                        reason="local limit exceeded")
            return REJECT_LOCAL_LIMIT_EXCEEDED
        return None

    def leave(self) -> None:
        """An admitted association has ended (released, aborted or lost)."""
        self.count.leave()

    # --- services ---------------------------------------------------------------------------------
    def _on_find(self, request: Request) -> Iterator[Response]:
        finder = self.finder
        if self.own_items_only:  # the calling AE title decides which station's items it sees
            finder = finder.for_station(request.peer.calling_ae_title)
        yield from handle_find(request, finder)


def _no_event_reports_here(request: Request) -> list[Response]:
    return [(dimse.UNRECOGNIZED_OPERATION, None)]


def _on_echo(request: Request) -> list[Response]:
    log.info("dicom.echo", calling_ae=request.peer.calling_ae_title)
    return [(dimse.SUCCESS, None)]
