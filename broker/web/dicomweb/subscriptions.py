"""UPS-RS subscriptions (PS3.18 11.10 Create Subscription, 11.11 Delete Subscription, 11.12 Suspend Global
Subscription) and the subscription channel (8.10.4 Open Notification Connection, a WebSocket).

The transactions are the DIMSE N-ACTIONs 3, 4 and 5 of the UPS service: each route builds the dataset a
DIMSE SCU would send (Receiving AE = the path's AE title, Deletion Lock from ``?deletionlock``, the
filter of a filtered global subscription from the query as matching keys) and calls the same
:meth:`UpsService.action <broker.ups.service.UpsService.action>`, so the subscription rules, the
initial State Reports and the reports of every later change are those of the DIMSE edge. The one
difference: a subscription made here is on the WebSocket channel (``ups_subscriptions.channel``), so
its AE need not be a DICOM peer and its reports wait in the outbox for the AE's channel
(:mod:`broker.web.dicomweb.channel`). An AE has one channel: its latest subscription, over DIMSE or
UPS-RS, decides it for all of its subscriptions.

Answers (PS3.18 Tables 11.10.3-1, 11.11.3-1, 11.12.3-1): 201 / 200 / 200 on success (the subscription's
``Content-Location`` is the WebSocket URL of its channel); 400 for a malformed AE title, UID, Deletion
Lock or filter, or a suspend of a workitem subscription; 404 for an unknown workitem, and for an
unsubscribe or suspend of an AE that has no such subscription (PS3.4's DIMSE answers success there;
the HTTP resource does not exist). Every refusal has a ``Warning: 299`` header saying why.

Tokens: the read role for the three transactions and the channel (a subscriber watches; it changes
no workitem). The channel takes the token as the live stream does: ``Authorization: Bearer`` or, for a
browser's WebSocket that cannot set headers, ``?token=``. A refused channel is answered 401 or 403
before the upgrade (or closed with 1008 where the server cannot answer a WebSocket with HTTP) and
recorded as a Security Alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Annotated, Any
from urllib.parse import parse_qsl

import structlog
from fastapi import APIRouter, Path, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from pydicom import Dataset
from sqlalchemy import Engine, select

from broker.audit import events as audit_events
from broker.audit.events import Source
from broker.cluster.nodes import node_id_for
from broker.domain import ups_notify, ups_view
from broker.domain.ups_states import NO_SUCH_UPS, NOT_APPROPRIATE_FOR_INSTANCE
from broker.store.tables import UpsSubscription, table_of
from broker.ups.service import SUBSCRIBE, SUSPEND_GLOBAL, UNSUBSCRIBE, UpsService
from broker.web.access_audit import ANONYMOUS
from broker.web.auth import ROLES, Caller, ReadAccess
from broker.web.dicomweb import channel as channels
from broker.web.dicomweb import qido
from broker.web.dicomweb.statuses import DATABASE_UNAVAILABLE, NOT_FOUND, HttpAnswer
from broker.web.dicomweb.workitems import requestor_ae
from broker.workflow.context import WorkflowConfig
from broker.workflow.outcome import PROCESSING_FAILURE, SUCCESS, Outcome

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
log = structlog.get_logger(__name__)

SUBSCRIPTIONS = table_of(UpsSubscription)
GLOBAL_UIDS = (ups_view.GLOBAL_SUBSCRIPTION, ups_view.FILTERED_GLOBAL_SUBSCRIPTION)
SUBSCRIPTION_NOT_FOUND = "The target Subscription was not found."
FILTER_ONLY_FILTERED = (f"matching keys are only for the filtered global subscription "
                        f"({ups_view.FILTERED_GLOBAL_SUBSCRIPTION})")
_CONTROL = frozenset({"includefield", "limit", "offset", "fuzzymatching", "emptyvaluematching",
                      "multiplevaluematching"})
_LOCK = threading.Lock()

WorkitemUID = Annotated[str, Path(description="the Workitem's SOP Instance UID, or the well-known UID of the "
                                              "global (1.2.840.10008.5.1.4.34.5) or filtered global "
                                              "(1.2.840.10008.5.1.4.34.5.1) subscription")]
AETitle = Annotated[str, Path(description="the subscriber's AE title (at most 16 characters, no backslash)")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the request is not valid (Warning header: why)"},
    401: {"description": "no known API token"}, 403: {"description": "the token's role is not enough"},
    404: {"description": "no such workitem or subscription"},
    503: {"description": "database unavailable; retry"},
}


class WebSocketUpsService(UpsService):
    """The UPS service whose subscriptions are on the WebSocket channel (any AE title may subscribe)."""

    channel = ups_notify.WEBSOCKET


def subscription_service(request: Request) -> UpsService:
    """The app's subscription service on the intake's write engine, made on first use."""
    state = request.app.state
    with _LOCK:
        made: UpsService | None = getattr(state, "dicomweb_subscriptions", None)
        if made is None:
            settings = state.settings
            made = WebSocketUpsService(state.intake().engine, WorkflowConfig.from_settings(settings),
                                       uid_root=settings.uid_root)
            state.dicomweb_subscriptions = made
    return made


def valid_ae_title(text: str) -> bool:
    """An AE value (PS3.5 Table 6.2-1): 1-16 characters of the default repertoire without backslash or
    control characters, not only spaces."""
    return 0 < len(text) <= 16 and text.strip() != "" and all(" " <= c <= "~" and c != "\\" for c in text)


def _service_name(request: Request) -> str:
    return request.headers.get("host") or request.url.netloc or "broker"


def _refusal(request: Request, status_code: int, reason: str, outcome: Outcome | None = None,
             warning: str = "") -> JSONResponse:
    """A refusal: the reason in the Warning header (``299 <service>: <text>``) and in the body."""
    body: dict[str, Any] = {"detail": reason}
    if outcome is not None:
        body["dimse_status"] = f"{outcome.status:04X}"
    return JSONResponse(body, status_code=status_code,
                        headers=HttpAnswer(status_code, warning or reason).warning_header(_service_name(request)))


def _failure(request: Request, outcome: Outcome) -> JSONResponse:
    """The HTTP answer of a failed N-ACTION 3-5."""
    comment = outcome.error_comment or f"DIMSE status {outcome.status:04X}"
    if outcome.status == NO_SUCH_UPS:
        return _refusal(request, 404, comment, outcome, NOT_FOUND)
    if outcome.status == PROCESSING_FAILURE:
        return _refusal(request, 503 if comment.startswith(DATABASE_UNAVAILABLE) else 500, comment, outcome)
    if outcome.status == NOT_APPROPRIATE_FOR_INSTANCE or 0x0100 <= outcome.status <= 0x01FF:
        return _refusal(request, 400, comment, outcome)
    return _refusal(request, 409 if 0xC000 <= outcome.status <= 0xCFFF else 500, comment, outcome)


def _check_path(request: Request, workitem: str, aetitle: str) -> Response | None:
    if not valid_ae_title(aetitle):
        return _refusal(request, 400, f"{aetitle[:20]!r} is not an AE title (1-16 characters, no backslash)")
    if len(workitem) > 64 or not is_uid(workitem):
        return _refusal(request, 400, f"the workitem UID {workitem[:70]!r} is not a UID")
    return None


def is_uid(text: str) -> bool:
    """Whether ``text`` is a UID (digits in components, no leading zeros)."""
    return bool(text) and all(part.isdigit() and (part == "0" or not part.startswith("0")) and part.isascii()
                              for part in text.split("."))


def _subscription_dataset(request: Request, workitem: str, aetitle: str) -> Dataset | Response:
    """The N-ACTION 3 dataset of the request: Receiving AE, Deletion Lock, and for the filtered global
    subscription the matching keys of the query (QIDO-RS syntax: ``{attribute}={value}``, or
    ``filter={attribute}={value}``)."""
    lock = "FALSE"
    keys: list[tuple[str, str]] = []
    for name, value in parse_qsl(request.url.query, keep_blank_values=True):
        if name.lower() == "deletionlock":
            if value.strip().lower() not in ("true", "false"):
                return _refusal(request, 400, f"deletionlock must be true or false, not {value[:20]!r}")
            lock = value.strip().upper()
        elif name.lower() in _CONTROL:
            return _refusal(request, 400, f"{name} is a search parameter, not one of a subscription")
        elif name.lower() == "filter":
            attribute, _, matching = value.partition("=")
            keys.append((attribute, matching))
        else:
            keys.append((name, value))
    dataset = Dataset()
    if keys:
        if workitem != ups_view.FILTERED_GLOBAL_SUBSCRIPTION:
            return _refusal(request, 400, FILTER_ONLY_FILTERED)
        try:
            dataset = qido.parse_search(keys, qido.UPS).identifier
        except qido.QidoError as exc:
            return _refusal(request, 400, f"filter: {exc}")
    dataset.ReceivingAE = aetitle
    dataset.DeletionLock = lock
    return dataset


def _channel_url(request: Request, aetitle: str) -> str:
    url = str(request.url_for("open_channel", aetitle=aetitle))
    return "wss" + url[5:] if url.startswith("https") else "ws" + url[4:] if url.startswith("http") else url


def _source(request: Request, caller: Caller) -> Source:
    return Source(caller.label, request.client.host if request.client else "", "http")


# --- Create Subscription (PS3.18 11.10, N-ACTION 3) --------------------------------------------------
@router.post("/workitems/{workitem}/subscribers/{aetitle}", status_code=201,
             summary="Subscribe an AE to a workitem's events, or to all / filtered workitems (UPS-RS, N-ACTION 3)",
             responses={201: {"description": "subscribed; Content-Location is the WebSocket URL of the AE's "
                                             "channel, which carries the reports"}, **_ERRORS})
async def subscribe(request: Request, workitem: WorkitemUID, aetitle: AETitle, caller: ReadAccess) -> Response:
    """Subscribe ``aetitle`` to ``workitem`` (``?deletionlock=true|false``); the well-known global UID
    subscribes it to every workitem, the filtered global one to those matching the query's keys. The
    initial State Reports are queued for the AE's channel at once."""
    problem = _check_path(request, workitem, aetitle)
    if problem is not None:
        return problem
    dataset = _subscription_dataset(request, workitem, aetitle)
    if isinstance(dataset, Response):
        return dataset
    service = subscription_service(request)
    source = _source(request, caller)
    outcome = await asyncio.to_thread(service.action, workitem, SUBSCRIBE, dataset, requestor_ae(caller.label),
                                      source.host)
    log.info("dicomweb.subscribed" if outcome.ok else "dicomweb.subscribe_refused", workitem=workitem,
             subscriber=aetitle, token=caller.label, dimse_status=f"{outcome.status:04X}")
    if outcome.status != SUCCESS:
        return _failure(request, outcome)
    return Response(status_code=201, headers={"Content-Location": _channel_url(request, aetitle)})


# --- Delete Subscription (PS3.18 11.11, N-ACTION 4) --------------------------------------------------
@router.delete("/workitems/{workitem}/subscribers/{aetitle}",
               summary="Unsubscribe an AE (UPS-RS, N-ACTION 4); the global UID ends all of its subscriptions",
               responses={200: {"description": "unsubscribed"}, **_ERRORS})
async def unsubscribe(request: Request, workitem: WorkitemUID, aetitle: AETitle, caller: ReadAccess) -> Response:
    """End the AE's subscription to ``workitem``; for the global UIDs, every subscription of the AE."""
    problem = _check_path(request, workitem, aetitle)
    if problem is not None:
        return problem
    if not await asyncio.to_thread(_subscribed, request.app.state.engine, aetitle, workitem, False):
        return _refusal(request, 404, SUBSCRIPTION_NOT_FOUND)
    dataset = Dataset()
    dataset.ReceivingAE = aetitle
    service = subscription_service(request)
    outcome = await asyncio.to_thread(service.action, workitem, UNSUBSCRIBE, dataset, requestor_ae(caller.label),
                                      _source(request, caller).host)
    log.info("dicomweb.unsubscribed", workitem=workitem, subscriber=aetitle, token=caller.label,
             dimse_status=f"{outcome.status:04X}")
    return Response(status_code=200) if outcome.status == SUCCESS else _failure(request, outcome)


# --- Suspend Global Subscription (PS3.18 11.12, N-ACTION 5) -------------------------------------------
@router.post("/workitems/{workitem}/subscribers/{aetitle}/suspend",
             summary="Suspend an AE's global subscription: no new workitems (UPS-RS, N-ACTION 5)",
             responses={200: {"description": "suspended"}, **_ERRORS})
async def suspend(request: Request, workitem: WorkitemUID, aetitle: AETitle, caller: ReadAccess) -> Response:
    """The AE's global (or filtered global) subscription takes no workitems created from now on; those
    it covers already keep reporting."""
    problem = _check_path(request, workitem, aetitle)
    if problem is not None:
        return problem
    if workitem not in GLOBAL_UIDS:
        return _refusal(request, 400, "suspend applies to the global and filtered global subscriptions")
    if not await asyncio.to_thread(_subscribed, request.app.state.engine, aetitle, workitem, True):
        return _refusal(request, 404, SUBSCRIPTION_NOT_FOUND)
    dataset = Dataset()
    dataset.ReceivingAE = aetitle
    service = subscription_service(request)
    outcome = await asyncio.to_thread(service.action, workitem, SUSPEND_GLOBAL, dataset,
                                      requestor_ae(caller.label), _source(request, caller).host)
    log.info("dicomweb.suspended", subscriber=aetitle, token=caller.label, dimse_status=f"{outcome.status:04X}")
    return Response(status_code=200) if outcome.status == SUCCESS else _failure(request, outcome)


def _subscribed(engine: Engine, ae_title: str, workitem: str, global_only: bool) -> bool:
    """Whether the AE has the subscription the request names: to the workitem, or (a global UID) any
    (``global_only``: any global one)."""
    query = select(SUBSCRIPTIONS.c.id).where(SUBSCRIPTIONS.c.subscriber_ae == ae_title)
    if global_only:
        query = query.where(SUBSCRIPTIONS.c.is_global.is_(True))
    elif workitem not in GLOBAL_UIDS:
        query = query.where(SUBSCRIPTIONS.c.workitem_uid == workitem)
    with engine.connect() as db:
        return db.execute(query.limit(1)).first() is not None


# --- Open Notification Connection (PS3.18 8.10.4, the WebSocket channel) -------------------------------
@router.get("/subscribers/{aetitle}", summary="The AE's event channel: a WebSocket (send Upgrade: websocket)",
            status_code=426, responses={426: {"description": "this resource is a WebSocket"}})
async def channel_without_upgrade(request: Request, aetitle: AETitle) -> Response:
    """A plain GET of the channel: it is only served as a WebSocket."""
    return _refusal(request, 426, "this resource is a WebSocket: open it with Upgrade: websocket")


@router.websocket("/subscribers/{aetitle}", name="open_channel")
async def open_channel(websocket: WebSocket, aetitle: str) -> None:
    """The AE's event reports, one DICOM JSON text message each, in the order of the changes, starting
    with those that waited while no channel was open; until the client or the server closes it, or a
    newer channel for the same AE takes over (close code 4001)."""
    caller = await _channel_caller(websocket)
    if caller is None:
        return
    if not valid_ae_title(aetitle):
        await _deny(websocket, 400, f"{aetitle[:20]!r} is not an AE title")
        return
    state = websocket.app.state
    hub = channels.hub_of(state, state.engine, state.intake().engine, f"{node_id_for(state.settings)}/dicomweb")
    channel = await hub.open(aetitle, websocket)
    if channel is None:
        with contextlib.suppress(Exception):  # the client may have left already
            await _deny(websocket, 503, "another channel for this AE is open and did not let go; retry")
        return
    host = websocket.client.host if websocket.client else ""
    _record(websocket, audit_events.query(Source(caller.label, host, "http"), state.broker_participant(),
                                          what=websocket.url.path, query_bytes=b""))
    log.info("dicomweb.channel_open", subscriber=aetitle, token=caller.label)
    await hub.serve(channel)


async def _channel_caller(websocket: WebSocket) -> Caller | None:
    """The caller of a channel (read role), from the Authorization header or ``?token=``; a refusal is
    answered (401 / 403), recorded as a Security Alert, and None returned."""
    header = websocket.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    presented = credentials.strip() if scheme.lower() == "bearer" else websocket.query_params.get("token")
    caller: Caller | None = websocket.app.state.tokens.caller(presented)
    if caller is not None and caller.role in ROLES:
        return caller
    status, reason = (401, "no valid API token") if caller is None else (403, "the token's role does not allow this")
    host = websocket.client.host if websocket.client else ""
    _record(websocket, audit_events.security_alert(
        Source(caller.label if caller else ANONYMOUS, host, "http"), websocket.app.state.broker_participant(),
        reason=reason, resource=websocket.url.path, alert=audit_events.USE_OF_RESTRICTED_FUNCTION))
    await _deny(websocket, status, "an API token with the read role is required (Authorization: Bearer, or "
                "?token=)" if status == 401 else f"this token has the {caller.role if caller else ''} role; "
                "the channel needs read")
    return None


async def _deny(websocket: WebSocket, status: int, reason: str) -> None:
    """Refuse the upgrade with an HTTP answer where the server can send one (uvicorn can), else close
    with 1008 (policy violation) before accepting."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        await websocket.send_denial_response(JSONResponse({"detail": reason}, status_code=status, headers=headers))
    else:
        await websocket.close(code=1008 if status in (401, 403) else 1013, reason=reason[:120])


def _record(websocket: WebSocket, event: audit_events.AuditEvent) -> None:
    audit = websocket.app.state.audit
    if audit is not None:
        try:
            audit.submit(event)
        except Exception as exc:  # the audit trail's trouble is logged; the channel goes on
            log.error("web.audit_failed", path=websocket.url.path, error=type(exc).__name__)
