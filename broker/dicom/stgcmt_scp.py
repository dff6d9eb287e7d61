"""Storage Commitment results (PS3.4 annex J) that the archive reports on an association it opens.

The broker requests commitment as SCU (:mod:`broker.outbound.dicom_peers`); the archive answers with
N-EVENT-REPORT either on that association or, later, on a new one where it takes the SCP role (role
selection). This is the handler for the second case; both end in
:meth:`~broker.stgcmt.service.CommitmentService.record_result`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import structlog
from pydicom.dataset import Dataset

from broker.dicom.association import Request, Response
from broker.dicom.statuses import status_dataset
from broker.stgcmt.service import CommitmentService
from broker.workflow.outcome import PROCESSING_FAILURE, Outcome, failure

log = structlog.get_logger(__name__)

# Event Type ID of the commitment report (PS3.4 J.3.3): 1 all committed, 2 failures exist.
STORAGE_COMMITMENT_SUCCESS = 1
STORAGE_COMMITMENT_FAILURES_EXIST = 2
NO_SUCH_EVENT_TYPE = 0x0113


def commitment_result(report: Dataset) -> tuple[str, list[tuple[str, str]], list[tuple[str, str, int]]]:
    """Transaction UID, committed (class, instance) and failed (class, instance, reason) of a report."""
    committed = [(str(item.get("ReferencedSOPClassUID", "")), str(item.get("ReferencedSOPInstanceUID", "")))
                 for item in report.get("ReferencedSOPSequence", [])]
    failed = [(str(item.get("ReferencedSOPClassUID", "")), str(item.get("ReferencedSOPInstanceUID", "")),
               int(item.get("FailureReason", 0x0110)))
              for item in report.get("FailedSOPSequence", [])]
    return str(report.get("TransactionUID", "")), committed, failed


def answer_report(event_type: int, decode: Callable[[], Dataset], commitment: CommitmentService,
                  calling_ae: str, host: str = "") -> Outcome:
    """The outcome of one commitment report, whichever association it came on: 0x0113 for an event
    type that is not a commitment result, 0x0110 when the event information cannot be decoded, else
    :meth:`CommitmentService.record_result`'s."""
    if event_type not in (STORAGE_COMMITMENT_SUCCESS, STORAGE_COMMITMENT_FAILURES_EXIST):
        return failure(NO_SUCH_EVENT_TYPE, f"event type {event_type} is not a commitment result")
    try:
        transaction_uid, committed, failed = commitment_result(decode())
    except Exception as exc:
        log.warning("stgcmt.bad_report", calling_ae=calling_ae, error=str(exc))
        return failure(PROCESSING_FAILURE, "event information cannot be decoded")
    outcome = commitment.record_result(transaction_uid, committed, failed, calling_ae, host)
    log.info("stgcmt.report", calling_ae=calling_ae, transaction_uid=transaction_uid,
             committed=len(committed), failed=len(failed), status=hex(outcome.status))
    return outcome


def handle_n_event_report(request: Request, commitment: CommitmentService) -> Iterator[Response]:
    """N-EVENT-REPORT from the archive with the result of an earlier commitment request."""
    outcome = answer_report(int(request.command.get("EventTypeID", 0)), request.data_set, commitment,
                            request.peer.calling_ae_title, request.peer.address)
    yield status_dataset(outcome), None
