"""The broker's DICOM application entity: which services it offers and how associations are run.

Services (SCP): Verification and Modality Worklist Information Model - FIND, in Explicit and Implicit
VR Little Endian. Associations beyond ``dicom_max_associations`` get A-ASSOCIATE-RJ (rejected-transient,
service-provider presentation, local limit exceeded); callers outside ``dicom_allowed_callers`` get
A-ASSOCIATE-RJ (rejected-permanent, service-user, calling AE title not recognized). Both are logged.
"""

from __future__ import annotations

import logging
import threading
from importlib.metadata import version
from typing import Any

import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine

from broker.config import Settings
from broker.dicom.access import CallerPolicy
from broker.dicom.mwl_scp import handle_find
from broker.dicom.transport import request_handler
from broker.mwl.finder import WorklistFinder
from broker.mwl.matching import WorklistOptions

log = structlog.get_logger(__name__)

TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
# (0002,0013), at most 16 characters; the Implementation Class UID stays pynetdicom's (no UID root of our own).
IMPLEMENTATION_VERSION_NAME = "WLBROKER_" + version("worklist-broker").replace(".", "")[:7]


def worklist_options(settings: Settings) -> WorklistOptions:
    """The matching options the settings ask for (the station restriction is set per association)."""
    return WorklistOptions(pn_case_insensitive=settings.mwl_pn_case_insensitive,
                           hidden_statuses=settings.hidden_statuses, page_size=settings.mwl_page_size)


def build_ae(settings: Settings) -> AE:
    """The application entity with its supported contexts, limits and timeouts."""
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(Verification, TRANSFER_SYNTAXES)
    ae.add_supported_context(ModalityWorklistInformationFind, TRANSFER_SYNTAXES)
    ae.maximum_associations = settings.dicom_max_associations
    ae.acse_timeout = settings.dicom_acse_timeout
    ae.dimse_timeout = settings.dicom_dimse_timeout
    ae.network_timeout = settings.dicom_network_timeout
    ae.maximum_pdu_size = settings.dicom_max_pdu
    # Called AE title is not enforced: modalities are often configured with a variant of it.
    ae.require_called_aet = False
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae


class _AcceptorServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a listen backlog that holds a burst of modalities.

    socketserver's default backlog is 5: with 50 modalities connecting at once the kernel dropped
    hundreds of connection attempts per benchmark series, and each dropped one waited for a TCP
    retransmission (1 s, 3 s, ...). The association limit, not the backlog, is what turns callers away.
    """

    request_queue_size = 256


class DicomServer:
    """The running DICOM listener; :meth:`start` returns once it accepts connections."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.ae = build_ae(settings)
        self.policy = CallerPolicy.from_pairs(settings.allowed_callers)
        self.finder = WorklistFinder(engine, worklist_options(settings))
        self.own_items_only = settings.mwl_station_sees_own_items
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO is one line per PDU
        # pynetdicom formats every request and response identifier for its debug log even when the
        # level drops the lines (~5% of a query's CPU here); mwl.query logs what an operator needs.
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    def handlers(self) -> list[Any]:
        """The event handlers bound to the server: the services and the association log."""
        return [
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_ECHO, _on_echo),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, _on_rejected),
            (evt.EVT_ESTABLISHED, _on_established),
            (evt.EVT_ABORTED, _on_aborted),
        ]

    def start(self) -> None:
        """Bind and serve in a background thread."""
        server = self.ae.make_server(
            (self.settings.dicom_host, self.settings.dicom_port), evt_handlers=self.handlers(),
            server_class=_AcceptorServer,
            request_handler=request_handler(self.settings.dicom_tcp_quickack))
        self._server = server
        # What AE.start_server does for its own servers: AE.shutdown() then stops this one too, and the
        # server's shutdown() expects to find itself there.
        self.ae._servers.append(server)
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True)
        self._thread.start()
        log.info("dicom.started", port=self.port, ae_title=self.settings.ae_title,
                 max_associations=self.settings.dicom_max_associations,
                 allow_list=sorted(self.policy.entries) or None, quickack=self.settings.dicom_tcp_quickack)

    def stop(self) -> None:
        """Abort the associations still open and stop accepting."""
        self.ae.shutdown()
        self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _on_find(self, event: Event) -> Any:
        finder = self.finder
        if self.own_items_only:  # the calling AE title decides which station's items it sees
            finder = finder.for_station(str(event.assoc.requestor.ae_title).strip())
        yield from handle_find(event, finder)

    def _on_requested(self, event: Event) -> None:
        requestor = event.assoc.requestor
        calling = str(requestor.primitive.calling_ae_title if requestor.primitive else requestor.ae_title).strip()
        address = str(requestor.address)
        if not self.policy.allows(calling, address):
            log.warning("dicom.association_refused", calling_ae=calling, peer=address,
                        reason="calling AE title not on the allow-list")
            event.assoc.acse.send_reject(*REJECT_CALLING_AE_NOT_RECOGNIZED)
            # As pynetdicom's own rejections do: wait until the A-ASSOCIATE-RJ is out and the peer has
            # closed, or the reactor would close the socket first and the caller would see an abort.
            event.assoc.kill()


def _on_echo(event: Event) -> int:
    log.info("dicom.echo", calling_ae=str(event.assoc.requestor.ae_title).strip())
    return 0x0000


def _on_rejected(event: Event) -> None:
    primitive = event.assoc.acceptor.primitive
    diagnostic = getattr(primitive, "diagnostic", None)
    reason = "local limit exceeded" if diagnostic == 0x02 and getattr(primitive, "result_source", 0) == 0x03 \
        else f"diagnostic {diagnostic}"
    log.warning("dicom.association_rejected", calling_ae=str(event.assoc.requestor.ae_title).strip(),
                peer=str(event.assoc.requestor.address), reason=reason)


def _on_established(event: Event) -> None:
    log.debug("dicom.association", calling_ae=str(event.assoc.requestor.ae_title).strip(),
              peer=str(event.assoc.requestor.address))


def _on_aborted(event: Event) -> None:
    log.info("dicom.association_aborted", calling_ae=str(event.assoc.requestor.ae_title).strip(),
             peer=str(event.assoc.requestor.address))
