"""UPS-RS workitem transactions (PS3.18 11.4-11.8): Create, Retrieve, Update, Change State and Request
Cancellation, under ``/dicomweb/workitems``, in ``application/dicom+json``.

Each route decodes the request into the dataset the DIMSE UPS SCP would get and calls the same
:class:`~broker.ups.service.UpsService` operation (N-CREATE, N-GET, N-SET, N-ACTION 1 and 2), so the
state table, the checks, the worklist item, the procedure, the RIS status, the subscribers' reports
and the audit records are exactly those of the DIMSE edge: one workitem, seen as a UPS, a worklist
item and a row of the board. The DIMSE status the service answers becomes the HTTP status and
Warning header of the transaction (:mod:`broker.web.dicomweb.statuses`).

Who asks: the API token. Retrieve needs the read role, the changes the write role. Where the UPS
model wants an AE title (the performer of a claim, the Requesting AE of a cancel request, the cause
of the timeline's entries) the token's label stands for it, made AE-shaped (:func:`requestor_ae`); the
audit records name the label itself at the client's address, on the HTTP channel.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import Annotated, Any
from urllib.parse import parse_qsl

import structlog
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from pydicom import Dataset
from pydicom.uid import generate_uid

from broker.audit.events import Source
from broker.domain import ups_view
from broker.ups.service import CHANGE_STATE, REQUEST_CANCEL_ACTION, UpsService
from broker.web.access_audit import note_patients, patient_ref
from broker.web.auth import Caller, ReadAccess, WriteAccess
from broker.web.dicomweb.media import DICOM_JSON, DicomJSONResponse
from broker.web.dicomweb.payload import PayloadError, media_type, read_dataset
from broker.web.dicomweb.statuses import HttpAnswer, Transaction, answer
from broker.workflow.context import WorkflowConfig
from broker.workflow.outcome import Outcome

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
log = structlog.get_logger(__name__)

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_RESERVED = frozenset({ups_view.GLOBAL_SUBSCRIPTION, ups_view.FILTERED_GLOBAL_SUBSCRIPTION})
_ACCEPTABLE = frozenset({DICOM_JSON, "application/*", "*/*"})
_REQUESTOR: ContextVar[Source | None] = ContextVar("dicomweb_requestor", default=None)
_LOCK = threading.Lock()

WorkitemUID = Annotated[str, Path(description="the Workitem's SOP Instance UID")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the request is not valid (Warning header: why)"},
    401: {"description": "no known API token"}, 403: {"description": "the token's role is not enough"},
    404: {"description": "no such workitem"},
    409: {"description": "the request conflicts with the workitem's state (Warning header: why)"},
    503: {"description": "database unavailable; retry"},
}


class HttpUpsService(UpsService):
    """The UPS service as UPS-RS calls it: the requestor of the audit records is the token at the
    client's address (the :data:`_REQUESTOR` of the call), not a calling AE title at it."""

    def dicom_source(self, calling_ae: str, host: str) -> Source:  # type: ignore[override]
        return _REQUESTOR.get() or UpsService.dicom_source(calling_ae, host)


def ups_services(request: Request) -> tuple[UpsService, UpsService]:
    """The app's UPS services, made on first use: one on the read engine (Retrieve), one on the write
    engine of the intake (the changes), as the REST API's writes use it."""
    state = request.app.state
    with _LOCK:
        made: tuple[UpsService, UpsService] | None = getattr(state, "dicomweb_ups", None)
        if made is None:
            settings = state.settings
            config = WorkflowConfig.from_settings(settings)
            options: dict[str, Any] = {"known_aes": frozenset(settings.peers), "uid_root": settings.uid_root}
            made = (HttpUpsService(state.engine, config, **options),
                    HttpUpsService(state.intake().engine, config, **options))
            state.dicomweb_ups = made
    return made


def requestor_ae(label: str) -> str:
    """The token label as the AE-valued attributes take it (Performer, Requesting AE): printable ASCII
    without backslash (other characters become ``_``), trimmed, at most 16 characters; ``DICOMWEB``
    when nothing is left."""
    shaped = "".join(c if " " <= c <= "~" and c != "\\" else "_" for c in label).strip()[:16].strip()
    return shaped or "DICOMWEB"


def _source(request: Request, caller: Caller) -> Source:
    return Source(caller.label, request.client.host if request.client else "", "http")


async def _write(request: Request, caller: Caller,
                 operation: Callable[[UpsService, str, str], Outcome]) -> Outcome:
    """Run ``operation(writer, requestor AE, client host)`` on the app's write service in a worker thread,
    with the token at the client's address as the audit requestor."""
    _, writer = ups_services(request)
    source = _source(request, caller)
    ae = requestor_ae(caller.label)
    return await asyncio.to_thread(_call, lambda: operation(writer, ae, source.host), source)


def _call(work: Callable[[], Outcome], source: Source) -> Outcome:
    """Run a service call with ``source`` as its audit requestor (in the worker thread: its own context)."""
    token = _REQUESTOR.set(source)
    try:
        return work()
    finally:
        _REQUESTOR.reset(token)


def _service_name(request: Request) -> str:
    """The ``<service>`` of the Warning header: the origin server as the client addressed it."""
    return request.headers.get("host") or request.url.netloc or "broker"


def _refusal(request: Request, status_code: int, reason: str, outcome: Outcome | None = None,
             warning: str = "") -> JSONResponse:
    """A failure response: the reason in the Warning header and in the body (with the DIMSE status,
    when the service answered, and the offending elements)."""
    body: dict[str, Any] = {"detail": reason}
    if outcome is not None:
        body["dimse_status"] = f"{outcome.status:04X}"
        if outcome.offending:
            body["offending"] = [f"{tag:08X}" for tag in outcome.offending]
    return JSONResponse(body, status_code=status_code,
                        headers=HttpAnswer(status_code, warning or reason).warning_header(_service_name(request)))


def _answer(request: Request, transaction: Transaction, outcome: Outcome, given_uid: bool = False,
            headers: dict[str, str] | None = None) -> Response:
    """The response of a change: empty on success (with a Warning for the "already" cases), else the
    refusal."""
    http = answer(transaction, outcome, transaction_uid_given=given_uid)
    if not http.ok:
        return _refusal(request, http.status_code, http.detail, outcome, http.warning)
    return Response(status_code=http.status_code,
                    headers={**(headers or {}), **http.warning_header(_service_name(request))})


async def _payload(request: Request, optional: bool = False) -> Dataset | Response:
    """The request's dataset, or the refusal (415 for another media type, 400 for a payload that is not
    one valid DICOM JSON dataset). ``optional``: an empty body is an empty dataset."""
    body = await request.body()
    if optional and not body.strip():
        return Dataset()
    if media_type(request.headers.get("content-type")) != DICOM_JSON:
        return _refusal(request, 415, f"the payload must be {DICOM_JSON}")
    try:
        return read_dataset(body)
    except PayloadError as exc:
        return _refusal(request, 400, str(exc))


def _bad_uid(request: Request, uid: str, what: str) -> Response | None:
    if len(uid) > 64 or not _UID.fullmatch(uid):
        return _refusal(request, 400, f"{what} {uid[:70]!r} is not a UID")
    return None


def _query_uid(request: Request, names: tuple[str, ...]) -> str | None:
    """A UID given as the query: ``?<uid>`` (PS3.18's template) or ``?<name>=<uid>``."""
    for name, value in parse_qsl(request.url.query, keep_blank_values=True):
        if name in names:
            return value
        if not value:  # a bare value: the UID itself (checked by the caller)
            return name
    return None


def _workitem_url(request: Request, uid: str) -> str:
    return str(request.url_for("retrieve_workitem", workitem=uid))


# --- Create (PS3.18 11.4, N-CREATE) ------------------------------------------------------------------
@router.post("/workitems", summary="Create a workitem (UPS-RS, N-CREATE)", status_code=201,
             responses={201: {"description": "created; Location and Content-Location name it"},
                        409: {"description": "a workitem with this UID exists"},
                        415: {"description": f"the payload is not {DICOM_JSON}"},
                        **{k: v for k, v in _ERRORS.items() if k != 404}})
async def create_workitem(request: Request, caller: WriteAccess) -> Response:
    """A new SCHEDULED workitem (and worklist item). Its UID: the query (``?<uid>`` or ``?workitem=<uid>``),
    else the payload's SOP Instance UID, else one the broker makes."""
    dataset = await _payload(request)
    if isinstance(dataset, Response):
        return dataset
    given = _query_uid(request, ("workitem",))
    in_payload = str(dataset.get("SOPInstanceUID", "") or "")
    if given and in_payload and given != in_payload:
        return _refusal(request, 400, "the payload's SOP Instance UID is not the workitem UID of the query")
    settings = request.app.state.settings
    uid = given or in_payload or str(generate_uid(prefix=f"{settings.uid_root}." if settings.uid_root else None))
    problem = _bad_uid(request, uid, "the workitem UID")
    if problem is not None:
        return problem
    if uid in _RESERVED:
        return _refusal(request, 400, f"{uid} is a well-known UID of the global subscriptions")
    outcome = await _write(request, caller, lambda writer, ae, host: writer.create(uid, dataset, ae, host))
    log.info("dicomweb.workitem_created" if outcome.ok else "dicomweb.workitem_refused", workitem=uid,
             token=caller.label, dimse_status=f"{outcome.status:04X}")
    location = _workitem_url(request, uid)
    return _answer(request, Transaction.CREATE, outcome,
                   headers={"Location": location, "Content-Location": location})


# --- Retrieve (PS3.18 11.5, N-GET) ---------------------------------------------------------------------
@router.get("/workitems/{workitem}", summary="Retrieve a workitem (UPS-RS, N-GET)", response_class=DicomJSONResponse,
            responses={200: {"content": {DICOM_JSON: {}},
                             "description": "a DICOM JSON array holding the workitem (no Transaction UID)"},
                       406: {"description": f"the Accept header does not allow {DICOM_JSON}"}, **_ERRORS})
async def retrieve_workitem(request: Request, workitem: WorkitemUID, _: ReadAccess) -> Response:
    """The whole workitem as N-GET gives it, without its Transaction UID (the owner's lock)."""
    if not _acceptable(request.headers.get("accept")):
        return _refusal(request, 406, f"this resource is served as {DICOM_JSON}")
    problem = _bad_uid(request, workitem, "the workitem UID")
    if problem is not None:
        return problem
    reader, _writer = ups_services(request)
    outcome = await asyncio.to_thread(reader.get, workitem)
    http = answer(Transaction.RETRIEVE, outcome)
    if not http.ok or outcome.attribute_list is None:
        return _refusal(request, http.status_code, http.detail, outcome, http.warning)
    found = outcome.attribute_list
    note_patients(request, [patient_ref(str(found.get("PatientID", "") or ""),
                                        str(found.get("IssuerOfPatientID", "") or ""))])
    return DicomJSONResponse([found.to_json_dict(bulk_data_threshold=1 << 30)],
                             headers={"Content-Location": _workitem_url(request, workitem)})


def _acceptable(accept: str | None) -> bool:
    """Whether the Accept header field allows DICOM JSON (absent: anything goes)."""
    if not accept or not accept.strip():
        return True
    for part in accept.split(","):
        media, *parameters = [p.strip().lower() for p in part.split(";")]
        if media in _ACCEPTABLE and not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000")
                                            for p in parameters):
            return True
    return False


# --- Update (PS3.18 11.6, N-SET) ---------------------------------------------------------------------
@router.post("/workitems/{workitem}", summary="Update a workitem (UPS-RS, N-SET)",
             responses={200: {"description": "updated"}, 415: {"description": f"the payload is not {DICOM_JSON}"},
                        **_ERRORS})
async def update_workitem(request: Request, workitem: WorkitemUID, caller: WriteAccess) -> Response:
    """Change the workitem's attributes (never its state). IN PROGRESS: only with the Transaction UID
    of the claim, as the query (``?<uid>`` or ``?transaction-uid=<uid>``) or in the payload."""
    problem = _bad_uid(request, workitem, "the workitem UID")
    if problem is not None:
        return problem
    dataset = await _payload(request)
    if isinstance(dataset, Response):
        return dataset
    given = _query_uid(request, ("transaction-uid", "transaction", "TransactionUID"))
    problem = _bad_uid(request, given, "the Transaction UID") if given else None
    if problem is not None:
        return problem
    in_payload = str(dataset.get("TransactionUID", "") or "")
    if given and in_payload and given != in_payload:
        return _refusal(request, 400, "the payload's Transaction UID is not the one of the query")
    if given:
        dataset.TransactionUID = given
    outcome = await _write(request, caller, lambda writer, ae, host: writer.set(workitem, dataset, ae, host))
    log.info("dicomweb.workitem_updated" if outcome.ok else "dicomweb.workitem_refused", workitem=workitem,
             token=caller.label, dimse_status=f"{outcome.status:04X}")
    return _answer(request, Transaction.UPDATE, outcome, bool(given or in_payload),
                   headers={"Content-Location": _workitem_url(request, workitem)})


# --- Change State (PS3.18 11.7, N-ACTION 1) ----------------------------------------------------------
@router.put("/workitems/{workitem}/state", summary="Change a workitem's state (UPS-RS, N-ACTION Change UPS State)",
            responses={200: {"description": "changed (Warning: already in that state)"},
                       415: {"description": f"the payload is not {DICOM_JSON}"}, **_ERRORS})
async def change_workitem_state(request: Request, workitem: WorkitemUID, caller: WriteAccess) -> Response:
    """Claim (IN PROGRESS, with a new Transaction UID), complete or cancel (COMPLETED / CANCELED, with the
    claim's Transaction UID): the payload holds Procedure Step State and Transaction UID."""
    problem = _bad_uid(request, workitem, "the workitem UID")
    if problem is not None:
        return problem
    dataset = await _payload(request)
    if isinstance(dataset, Response):
        return dataset
    outcome = await _write(request, caller,
                           lambda writer, ae, host: writer.action(workitem, CHANGE_STATE, dataset, ae, host))
    log.info("dicomweb.workitem_state", workitem=workitem, token=caller.label,
             state=str(dataset.get("ProcedureStepState", "")), dimse_status=f"{outcome.status:04X}")
    return _answer(request, Transaction.CHANGE_STATE, outcome, bool(dataset.get("TransactionUID")))


# --- Request Cancellation (PS3.18 11.8, N-ACTION 2) --------------------------------------------------
@router.post("/workitems/{workitem}/cancelrequest",
             summary="Request a workitem's cancellation (UPS-RS, N-ACTION Request UPS Cancel)", status_code=202,
             responses={202: {"description": "accepted: a SCHEDULED workitem is canceled at once, the "
                                             "performer of an IN PROGRESS one is told (Warning: already canceled)"},
                        415: {"description": f"the payload is not {DICOM_JSON}"}, **_ERRORS})
async def request_cancellation(request: Request, workitem: WorkitemUID, caller: WriteAccess) -> Response:
    """Ask for the workitem to be canceled; the payload (optional) may give Reason For Cancellation,
    Procedure Step Discontinuation Reason Code Sequence, Contact Display Name and Contact URI."""
    problem = _bad_uid(request, workitem, "the workitem UID")
    if problem is not None:
        return problem
    dataset = await _payload(request, optional=True)
    if isinstance(dataset, Response):
        return dataset
    outcome = await _write(request, caller,
                           lambda writer, ae, host: writer.action(workitem, REQUEST_CANCEL_ACTION, dataset, ae, host))
    log.info("dicomweb.workitem_cancel_requested", workitem=workitem, token=caller.label,
             dimse_status=f"{outcome.status:04X}")
    return _answer(request, Transaction.REQUEST_CANCELLATION, outcome)
