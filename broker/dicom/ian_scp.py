"""Instance Availability Notification SCP (PS3.4 annex R): the N-CREATE handler.

Correlation (Study Instance UID, MPPS UID) and effects are :class:`~broker.ian.service.IanService`'s.
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog
from pydicom.uid import generate_uid

from broker.dicom.association import Request, Response
from broker.dicom.statuses import failure_dataset, status_dataset
from broker.ian.service import IanService
from broker.workflow.outcome import PROCESSING_FAILURE

log = structlog.get_logger(__name__)


def handle_n_create(request: Request, ian: IanService) -> Iterator[Response]:
    """N-CREATE: the archive says which instances of a study are available, and where."""
    sop_instance_uid = str(request.command.get("AffectedSOPInstanceUID") or "") or str(generate_uid())
    try:
        dataset = request.data_set()
    except Exception as exc:
        log.warning("ian.bad_data_set", calling_ae=request.peer.calling_ae_title, error=str(exc))
        yield failure_dataset(PROCESSING_FAILURE, "attribute list cannot be decoded"), None
        return
    outcome = ian.create(sop_instance_uid, dataset, request.peer.calling_ae_title)
    status = status_dataset(outcome)
    if "AffectedSOPInstanceUID" not in request.command:
        status.AffectedSOPInstanceUID = sop_instance_uid
    yield status, outcome.attribute_list
