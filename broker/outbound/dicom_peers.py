"""Associations to DICOM peers (``BROKER_DICOM_PEERS``) as SCU: MPPS forwarding, commitment requests.

One association per event: forwards are rare compared to the modality's traffic, and a fresh
association after every failure is what a retry needs anyway.

Peers named in ``dicom_tls_peers`` are reached over TLS (:class:`PeerTls`): the peer's certificate is
verified against the CA bundle (and its host name, with ``tls_check_hostname``), and the broker shows
its own, so a peer requiring mutual TLS accepts it. A peer whose certificate is not accepted fails the
delivery like a peer that is down: the event is retried.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from typing import Any

import structlog
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    StorageCommitmentPushModel,
)
from pynetdicom.status import code_to_category

from broker.config import Peer, Settings
from broker.dicom.statuses import status_dataset
from broker.dicom.stgcmt_scp import answer_report
from broker.outbound.requestor_responses import keep_responses_for_the_caller
from broker.stgcmt.service import CommitmentService
from broker.tls import client_context
from broker.workflow.outcome import PROCESSING_FAILURE, Outcome, failure

log = structlog.get_logger(__name__)

SUCCESS = 0x0000
DUPLICATE_SOP_INSTANCE = 0x0111
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# PS3.4 J.3.2: the well-known SOP Instance of the Storage Commitment Push Model and its action type.
STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1
STATUS_SUCCESS, STATUS_WARNING = "Success", "Warning"


class PeerFailure(Exception):
    """The peer could not be reached or answered with a failure: the event is retried."""


class PeerTls:
    """Which peers the broker reaches over TLS (``dicom_tls_peers``), with the process's client context."""

    def __init__(self, settings: Settings) -> None:
        self.peers = settings.tls_peers
        # Built now, when the handlers are: a CA bundle that cannot be read fails at once, not per event.
        self.context = client_context(settings) if self.peers else None

    def context_for(self, peer: Peer) -> ssl.SSLContext | None:
        """The context to reach ``peer`` with, None for a plain connection."""
        return self.context if peer.ae_title in self.peers else None

    def tls_args(self, peer: Peer) -> tuple[ssl.SSLContext, str] | None:
        """pynetdicom's ``tls_args`` for ``peer`` (the host name it is checked against), or None."""
        context = self.context_for(peer)
        return (context, peer.host) if context is not None else None


def _tls_args(tls: PeerTls | None, peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    """None (plain) without ``tls``, which is every sender's default."""
    return tls.tls_args(peer) if tls is not None else None


def _over(tls: PeerTls | None, peer: Peer) -> str:
    """" over TLS" for a TLS peer: pynetdicom logs a refused handshake but reports no association only,
    so the event's error at least says where to look (a certificate, not a peer that is down)."""
    return " over TLS (handshake or association refused)" if _tls_args(tls, peer) is not None else ""


def forward_mpps(calling_ae: str, peer: Peer, operation: str, sop_instance_uid: str, dataset_json: dict[str, Any],
                 timeout: float = 30.0, tls: PeerTls | None = None) -> None:
    """Send one MPPS N-CREATE or N-SET to ``peer`` (over TLS when ``tls`` says so). A 0x0111 answer to a
    repeated N-CREATE counts as delivered (the first attempt reached the peer, its response was lost)."""
    keep_responses_for_the_caller()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=_tls_args(tls, peer))
    if not assoc.is_established:
        raise PeerFailure(f"no association with {peer.ae_title}@{peer.host}:{peer.port}{_over(tls, peer)}")
    try:
        dataset = Dataset.from_json(dataset_json)
        if operation == "N-CREATE":
            status, _ = assoc.send_n_create(dataset, ModalityPerformedProcedureStep, sop_instance_uid)
        else:
            status, _ = assoc.send_n_set(dataset, ModalityPerformedProcedureStep, sop_instance_uid)
    finally:
        assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    if code == SUCCESS or (operation == "N-CREATE" and code == DUPLICATE_SOP_INSTANCE):
        log.info("mpps.forwarded", target=peer.ae_title, operation=operation, sop_instance_uid=sop_instance_uid)
        return
    raise PeerFailure(f"{peer.ae_title} answered {operation} with status {code:#06x}" if code >= 0
                      else f"no response from {peer.ae_title} to {operation}")


@dataclass(frozen=True)
class CommitmentRequestMessage:
    """What one Storage Commitment N-ACTION (Request Storage Commitment, action type 1) carries."""

    transaction_uid: str
    archive: Peer
    calling_ae: str
    referenced: tuple[tuple[str, str], ...]  # (Referenced SOP Class UID, Referenced SOP Instance UID)


def send_commitment_request(request: CommitmentRequestMessage, *, commitment: CommitmentService | None = None,
                            report_wait: float = 5.0, timeout: float = 30.0,
                            tls: PeerTls | None = None) -> None:
    """Send the N-ACTION (Request Storage Commitment, action type 1) to the archive and keep the
    association open up to ``report_wait`` seconds for its N-EVENT-REPORT on it.

    The association proposes the Storage Commitment Push Model with SCP/SCU role selection (the broker
    may take both roles), so the archive may report on it. A report that arrives is recorded through
    ``commitment`` (:meth:`CommitmentService.record_result`) and answered with the outcome's status;
    without one the association is released and the request stays PENDING: the archive reports on an
    association it opens (the broker's DICOM server takes it) or the timeout sweep fails it.

    Raises :class:`PeerFailure` when there is no association (a TLS peer whose certificate is refused
    included), the archive does not accept the class, or its N-ACTION answer is missing or a failure:
    the event is retried with backoff.
    """
    archive = request.archive
    recorded = threading.Event()  # the report of this transaction is recorded ...
    reported = threading.Event()  # ... and its response is on the wire: the association may be released

    def on_report(event: Any) -> tuple[Dataset, None]:
        """N-EVENT-REPORT on this association, in the association's thread."""
        outcome = _report_outcome(event, commitment, archive.ae_title)
        if outcome.ok:
            try:
                reported_uid = str(event.event_information.get("TransactionUID", ""))
            except Exception:
                reported_uid = ""
            if reported_uid == request.transaction_uid:
                recorded.set()
        return status_dataset(outcome), None

    def on_sent(event: Any) -> None:
        # Released only after the N-EVENT-REPORT response went out: an A-RELEASE-RQ sent while the
        # handler still runs would overtake it, and the archive would see no answer to its report.
        if recorded.is_set() and type(event.message).__name__ == "N_EVENT_REPORT_RSP":
            reported.set()

    keep_responses_for_the_caller()
    ae = AE(ae_title=request.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(StorageCommitmentPushModel, TRANSFER_SYNTAXES)
    assoc = ae.associate(archive.host, archive.port, ae_title=archive.ae_title, tls_args=_tls_args(tls, archive),
                         ext_neg=[build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)],
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report), (evt.EVT_DIMSE_SENT, on_sent)])
    if not assoc.is_established:
        raise PeerFailure(f"no association with {archive.ae_title}@{archive.host}:{archive.port}"
                          f"{_over(tls, archive)}")
    try:
        if not any(cx.abstract_syntax == StorageCommitmentPushModel for cx in assoc.accepted_contexts):
            raise PeerFailure(f"{archive.ae_title} does not accept the Storage Commitment Push Model")
        action = Dataset()
        action.TransactionUID = request.transaction_uid
        action.ReferencedSOPSequence = [_referenced(sop_class, sop_instance)
                                        for sop_class, sop_instance in request.referenced]
        status, _ = assoc.send_n_action(action, REQUEST_STORAGE_COMMITMENT, StorageCommitmentPushModel,
                                        STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
        code = int(getattr(status, "Status", -1)) if status else -1
        if code < 0:
            raise PeerFailure(f"no response from {archive.ae_title} to the commitment N-ACTION")
        if code_to_category(code) not in (STATUS_SUCCESS, STATUS_WARNING):
            raise PeerFailure(f"{archive.ae_title} answered the commitment N-ACTION with status {code:#06x}")
        log.info("stgcmt.sent", archive=archive.ae_title, transaction_uid=request.transaction_uid,
                 instances=len(request.referenced), status=hex(code))
        if report_wait > 0 and reported.wait(report_wait):
            log.info("stgcmt.reported_on_request_association", transaction_uid=request.transaction_uid)
    finally:
        if assoc.is_established:
            assoc.release()


def _report_outcome(event: Any, commitment: CommitmentService | None, calling_ae: str) -> Outcome:
    if commitment is None:  # nobody to record it: the archive must report again later
        return failure(PROCESSING_FAILURE, "commitment results are not recorded here")
    try:
        return answer_report(int(event.event_type), lambda: event.event_information, commitment, calling_ae)
    except Exception as exc:  # never let an exception escape into pynetdicom's reactor
        log.exception("stgcmt.report_failed", calling_ae=calling_ae, error=type(exc).__name__)
        return failure(PROCESSING_FAILURE, "the result could not be recorded")


def _referenced(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item
