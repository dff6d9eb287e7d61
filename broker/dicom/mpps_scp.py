"""Modality Performed Procedure Step SCP (PS3.4 annex F): N-CREATE and N-SET handlers.

The rules, the state machine and the effects are :class:`~broker.mpps.service.MppsService`'s; these
handlers only decode the request, call it, and answer with its outcome. The service commits the change
(and the outbox rows of what follows from it) before it returns, so a success status sent here means
the event is on disk.
"""

from __future__ import annotations

from collections.abc import Iterator

from broker.dicom.association import Request, Response
from broker.dicom.statuses import answer_n_create, answer_with_data_set
from broker.mpps.service import MppsService


def handle_n_create(request: Request, mpps: MppsService) -> Iterator[Response]:
    """N-CREATE: a modality starts a performed procedure step."""
    yield from answer_n_create(request, lambda uid, dataset, calling_ae: mpps.create(uid, dataset, calling_ae,
                                                                                      request.peer.address))


def handle_n_set(request: Request, mpps: MppsService) -> Iterator[Response]:
    """N-SET: the modality updates, completes or discontinues the step."""
    uid = str(request.command.get("RequestedSOPInstanceUID") or "")
    yield from answer_with_data_set(request,
                                    lambda dataset: mpps.update(uid, dataset, request.peer.calling_ae_title,
                                                                request.peer.address))
