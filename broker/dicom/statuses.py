"""A domain :class:`~broker.workflow.outcome.Outcome` as the status part of a DIMSE response, and the
request decoding the normalized-service handlers share."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from broker.dicom.association import Request, Response
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


def failure_dataset(status_code: int, comment: str, offending: tuple[int, ...] = ()) -> Dataset:
    """A failure status with an Error Comment (cut to the 64 characters of LO) and, when known, the
    Offending Element tags."""
    status = Dataset()
    status.Status = status_code
    status.ErrorComment = comment[:64]
    if offending:
        status.OffendingElement = list(offending)
    return status


def decoded_data_set(request: Request, what: str) -> tuple[Dataset | None, Dataset | None]:
    """The request's data set, or (when it cannot be decoded) a 0110 failure naming ``what``, logged."""
    try:
        return request.data_set(), None
    except Exception as exc:
        log.warning("dicom.bad_data_set", calling_ae=request.peer.calling_ae_title,
                    command=hex(int(request.command.CommandField)), error=str(exc))
        return None, failure_dataset(PROCESSING_FAILURE, f"{what} cannot be decoded")


def answer_n_create(request: Request, create: Callable[[str, Dataset, str], Outcome]) -> Iterator[Response]:
    """An N-CREATE handed to a domain service's ``create(sop_instance_uid, dataset, calling_ae)``. A request
    without an Affected SOP Instance UID gets one assigned here, returned in the response (PS3.7
    10.1.5.1.4)."""
    sop_instance_uid = str(request.command.get("AffectedSOPInstanceUID") or "")
    assigned = not sop_instance_uid
    if assigned:
        sop_instance_uid = str(generate_uid())
    dataset, failure = decoded_data_set(request, "attribute list")
    if dataset is None or failure is not None:
        yield failure or PROCESSING_FAILURE, None
        return
    outcome = create(sop_instance_uid, dataset, request.peer.calling_ae_title)
    status = status_dataset(outcome)
    if assigned:
        status.AffectedSOPInstanceUID = sop_instance_uid
    yield status, outcome.attribute_list


def answer_with_data_set(request: Request, what: str, call: Callable[[Dataset], Outcome],
                         attribute_list: bool = True) -> Iterator[Response]:
    """A request whose data set a domain service takes (N-SET, N-ACTION): 0110 naming ``what`` when it
    cannot be decoded, else the service's outcome (with its attribute list, unless ``attribute_list`` is
    False)."""
    dataset, failure = decoded_data_set(request, what)
    if dataset is None or failure is not None:
        yield failure or PROCESSING_FAILURE, None
        return
    outcome = call(dataset)
    yield status_dataset(outcome), outcome.attribute_list if attribute_list else None
