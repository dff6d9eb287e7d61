"""Unified Procedure Step SCP (PS3.4 annex CC): N-CREATE, N-SET, N-GET, N-ACTION and C-FIND handlers.

The rules, the state table and the effects are :class:`~broker.ups.service.UpsService`'s; these
handlers decode the request, call it and answer with its outcome. A success status means the change
(and the events it queued for subscribers) is committed.
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog
from pydicom.multival import MultiValue
from sqlalchemy.exc import SQLAlchemyError

from broker.dicom.association import Request, Response
from broker.dicom.statuses import answer_n_create, answer_with_data_set, failure_dataset, status_dataset
from broker.domain.ups_matching import UnsupportedKey
from broker.ups.service import UpsService

log = structlog.get_logger(__name__)

PENDING, CANCEL, SUCCESS = 0xFF00, 0xFE00, 0x0000
UNABLE_TO_PROCESS = 0xC000


def _requested_uid(request: Request) -> str:
    return str(request.command.get("RequestedSOPInstanceUID") or request.command.get("AffectedSOPInstanceUID") or "")


def handle_n_create(request: Request, ups: UpsService) -> Iterator[Response]:
    """N-CREATE (Push): a new SCHEDULED workitem."""
    yield from answer_n_create(request, lambda uid, dataset, calling_ae: ups.create(uid, dataset, calling_ae,
                                                                                    request.peer.address))


def handle_n_set(request: Request, ups: UpsService) -> Iterator[Response]:
    """N-SET (Pull): the performer (or, while SCHEDULED, anyone) updates the workitem's attributes."""
    uid = _requested_uid(request)
    yield from answer_with_data_set(request,
                                    lambda dataset: ups.set(uid, dataset, request.peer.calling_ae_title,
                                                            request.peer.address),
                                    attribute_list=False)


def handle_n_get(request: Request, ups: UpsService) -> Iterator[Response]:
    """N-GET (Pull, Watch, Query): the workitem, or the attributes of the Attribute Identifier List."""
    identifiers = request.command.get("AttributeIdentifierList")
    if identifiers is None or identifiers == "":
        tags = None
    else:
        tags = [int(t) for t in identifiers] if isinstance(identifiers, MultiValue | list | tuple) \
            else [int(identifiers)]
    outcome = ups.get(_requested_uid(request), tags)
    yield status_dataset(outcome), outcome.attribute_list


def handle_n_action(request: Request, ups: UpsService) -> Iterator[Response]:
    """N-ACTION: change state (1), request cancel (2), subscribe (3), unsubscribe (4), suspend (5)."""
    uid, action_type = _requested_uid(request), int(request.command.get("ActionTypeID", 0))
    yield from answer_with_data_set(request,
                                    lambda dataset: ups.action(uid, action_type, dataset,
                                                               request.peer.calling_ae_title, request.peer.address),
                                    attribute_list=False)


def handle_find(request: Request, ups: UpsService) -> Iterator[Response]:
    """C-FIND (Pull, Watch, Query): the matching workitems, one pending response each."""
    calling = request.peer.calling_ae_title
    count = 0
    try:
        for response in ups.find(request.data_set()):
            if request.is_cancelled:
                yield CANCEL, None
                return
            count += 1
            yield PENDING, response
    except UnsupportedKey as exc:
        yield failure_dataset(UNABLE_TO_PROCESS, str(exc)), None
        return
    except SQLAlchemyError as exc:
        log.error("ups.find_failed", calling_ae=calling, error=type(exc).__name__)
        yield failure_dataset(0xC001, "database unavailable; please retry"), None
        return
    log.info("ups.find", calling_ae=calling, matches=count)
    yield SUCCESS, None
