"""Modality Performed Procedure Step SCP (PS3.4 annex F): N-CREATE and N-SET handlers.

The rules, the state machine and the effects are :class:`~broker.mpps.service.MppsService`'s; these
handlers only decode the request, call it, and answer with its outcome. The service commits the change
(and the outbox rows of what follows from it) before it returns, so a success status sent here means
the event is on disk.
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog
from pydicom.uid import generate_uid

from broker.dicom.association import Request, Response
from broker.dicom.statuses import failure_dataset, status_dataset
from broker.mpps.service import MppsService
from broker.workflow.outcome import PROCESSING_FAILURE

log = structlog.get_logger(__name__)


def handle_n_create(request: Request, mpps: MppsService) -> Iterator[Response]:
    """N-CREATE: a modality starts a performed procedure step. A request without an Affected SOP
    Instance UID gets one assigned here, returned in the response (PS3.7 10.1.5.1.4)."""
    sop_instance_uid = str(request.command.get("AffectedSOPInstanceUID") or "") or str(generate_uid())
    try:
        dataset = request.data_set()
    except Exception as exc:
        log.warning("mpps.bad_data_set", calling_ae=request.peer.calling_ae_title, error=str(exc))
        yield failure_dataset(PROCESSING_FAILURE, "attribute list cannot be decoded"), None
        return
    outcome = mpps.create(sop_instance_uid, dataset, request.peer.calling_ae_title)
    status = status_dataset(outcome)
    if "AffectedSOPInstanceUID" not in request.command:
        status.AffectedSOPInstanceUID = sop_instance_uid
    yield status, outcome.attribute_list


def handle_n_set(request: Request, mpps: MppsService) -> Iterator[Response]:
    """N-SET: the modality updates, completes or discontinues the step."""
    sop_instance_uid = str(request.command.get("RequestedSOPInstanceUID") or "")
    try:
        dataset = request.data_set()
    except Exception as exc:
        log.warning("mpps.bad_data_set", calling_ae=request.peer.calling_ae_title, error=str(exc))
        yield failure_dataset(PROCESSING_FAILURE, "modification list cannot be decoded"), None
        return
    outcome = mpps.update(sop_instance_uid, dataset, request.peer.calling_ae_title)
    yield status_dataset(outcome), outcome.attribute_list
