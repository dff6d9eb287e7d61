"""A domain :class:`~broker.workflow.outcome.Outcome` as the status part of a DIMSE response, and the
request decoding the normalized-service handlers share."""

from __future__ import annotations

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from broker.dicom.association import Request
from broker.workflow.outcome import PROCESSING_FAILURE, Outcome

log = structlog.get_logger(__name__)


def status_dataset(outcome: Outcome) -> Dataset:
    """Status, Error Comment, Error ID and Offending Element of ``outcome`` (PS3.7 annex C)."""
    status = Dataset()
    status.Status = outcome.status
    if outcome.error_comment:
        status.ErrorComment = outcome.error_comment[:64]
    if outcome.error_id is not None:
        status.ErrorID = outcome.error_id
    if outcome.offending:
        status.OffendingElement = list(outcome.offending)
    return status


def failure_dataset(status_code: int, comment: str) -> Dataset:
    """A failure status with an Error Comment (cut to the 64 characters of LO)."""
    status = Dataset()
    status.Status = status_code
    status.ErrorComment = comment[:64]
    return status


def decoded_data_set(request: Request, what: str) -> tuple[Dataset | None, Dataset | None]:
    """The request's data set, or (when it cannot be decoded) a 0110 failure naming ``what``, logged."""
    try:
        return request.data_set(), None
    except Exception as exc:
        log.warning("dicom.bad_data_set", calling_ae=request.peer.calling_ae_title,
                    command=hex(int(request.command.CommandField)), error=str(exc))
        return None, failure_dataset(PROCESSING_FAILURE, f"{what} cannot be decoded")


def affected_instance_uid(request: Request) -> tuple[str, bool]:
    """The Affected SOP Instance UID of an N-CREATE, or a new one when the SCU left it to the SCP
    (PS3.7 10.1.5.1.4); True when assigned here (the response must then carry it)."""
    given = str(request.command.get("AffectedSOPInstanceUID") or "")
    return (given, False) if given else (str(generate_uid()), True)
