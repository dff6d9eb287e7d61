"""Instance Availability Notification SCP (PS3.4 annex R): the N-CREATE handler.

Correlation (Study Instance UID, MPPS UID) and effects are :class:`~broker.ian.service.IanService`'s.
"""

from __future__ import annotations

from collections.abc import Iterator

from broker.dicom.association import Request, Response
from broker.dicom.dimse import PROCESSING_FAILURE
from broker.dicom.statuses import affected_instance_uid, decoded_data_set, status_dataset
from broker.ian.service import IanService


def handle_n_create(request: Request, ian: IanService) -> Iterator[Response]:
    """N-CREATE: the archive says which instances of a study are available, and where."""
    sop_instance_uid, assigned = affected_instance_uid(request)
    dataset, failure = decoded_data_set(request, "attribute list")
    if dataset is None or failure is not None:
        yield failure or PROCESSING_FAILURE, None
        return
    outcome = ian.create(sop_instance_uid, dataset, request.peer.calling_ae_title)
    status = status_dataset(outcome)
    if assigned:
        status.AffectedSOPInstanceUID = sop_instance_uid
    yield status, outcome.attribute_list
