"""A domain :class:`~broker.workflow.outcome.Outcome` as the status part of a DIMSE response, and the
request-to-service plumbing the normalized-service handlers share."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from broker.dicom.association import Request, Response
from broker.workflow.outcome import Outcome


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


def answer_n_create(request: Request, create: Callable[[str, Dataset, str], Outcome]) -> Iterator[Response]:
    """An N-CREATE handed to a domain service's ``create(sop_instance_uid, dataset, calling_ae)``. A request
    without an Affected SOP Instance UID gets one assigned here, returned in the response (PS3.7
    10.1.5.1.4)."""
    sop_instance_uid = str(request.command.get("AffectedSOPInstanceUID") or "")
    assigned = not sop_instance_uid
    if assigned:
        sop_instance_uid = str(generate_uid())
    outcome = create(sop_instance_uid, request.data_set(), request.peer.calling_ae_title)
    status = status_dataset(outcome)
    if assigned:
        status.AffectedSOPInstanceUID = sop_instance_uid
    yield status, outcome.attribute_list


def answer_with_data_set(request: Request, call: Callable[[Dataset], Outcome],
                         attribute_list: bool = True) -> Iterator[Response]:
    """A request whose data set a domain service takes (N-SET, N-ACTION): the service's outcome (with its
    attribute list, unless ``attribute_list`` is False). The data set was decoded before (an undecodable
    one is answered 0110 by the association, which names what it is)."""
    outcome = call(request.data_set())
    yield status_dataset(outcome), outcome.attribute_list if attribute_list else None
