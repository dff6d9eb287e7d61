"""``/api/steps``: create, change and cancel a scheduled procedure step over HTTP.

The JSON body becomes an HL7 v2.5.1 OMI^O23 (ORC-1 NW, XO or CA) from sender ``WLBROKER_API^HTTP``,
which goes through the broker's own HL7 intake (:mod:`broker.web.intake_bridge`). So a step made over
HTTP is indistinguishable from one the RIS sent: the same mapping (``mappings/``, sender-specific files
may match ``WLBROKER_API``), the same validation, the same rows, procedure state, outbox events and an
archive entry (its ``peer`` names the token). A refusal is answered 422 (409 for a duplicate order or
step, 404 for an unknown order) with the body field the HL7 problem is about.

HL7 orders carry steps together: a change replaces the order's steps (ORC XO), so it is allowed on a
step whose order has no other step; a cancel (ORC CA) cancels every not-started step of the order.
"""

from __future__ import annotations

import asyncio
from datetime import date, datetime
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from broker.audit.events import Source
from broker.hl7.message import escape
from broker.mapping.transforms import xpn_field
from broker.web.auth import Caller, WriteAccess
from broker.web.intake_bridge import Outcome, new_control_id, submit
from broker.web.listing import ORDERS, PATIENTS, PROCEDURES, STEPS, summaries
from broker.web.procedures import ProcedureSummary

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/api/steps", tags=["steps"])
SENDING_APPLICATION = "WLBROKER_API"
SENDING_FACILITY = "HTTP"
SENDER = f"{SENDING_APPLICATION}^{SENDING_FACILITY}"
PRIORITY = {"STAT": "S", "HIGH": "A", "ROUTINE": "R", "MEDIUM": "T"}
# The body field an HL7 problem location (segment-field) is about.
FIELD_OF_LOCATION = {
    "PID-3": "patient_id", "PID-5": "patient_name", "PID-7": "patient_birth_date", "PID-8": "patient_sex",
    "PV1-3": "patient_location", "PV1-8": "referring_physician", "PV1-19": "admission_id",
    "ORC-2": "placer_order_number", "ORC-3": "filler_order_number", "ORC-1": "placer_order_number",
    "TQ1-7": "scheduled_start", "TQ1-9": "priority", "OBR-4": "procedure_code", "OBR-16": "requesting_physician",
    "OBR-18": "accession_number", "OBR-19": "requested_procedure_id", "OBR-20": "sps_id", "OBR-24": "modality",
    "IPC-1": "accession_number", "IPC-2": "requested_procedure_id", "IPC-3": "study_instance_uid",
    "IPC-4": "sps_id", "IPC-5": "modality", "IPC-6": "protocol_code", "IPC-7": "station_name",
    "IPC-8": "location", "IPC-9": "station_ae_title",
}
STATUS_OF_CODE = {"205": 409, "204": 404}


class Code(BaseModel):
    """A coded entry: code value, meaning, coding scheme designator."""

    value: str = Field(min_length=1, max_length=16)
    meaning: str = Field("", max_length=64)
    scheme: str = Field("LOCAL", max_length=16)


class StepIn(BaseModel):
    """One requested procedure with one scheduled step, and its patient and order."""

    patient_id: str = Field(min_length=1, max_length=64)
    issuer_of_patient_id: str = Field("", max_length=64)
    patient_name: str = Field("", max_length=324, description="DICOM PN: FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX")
    patient_birth_date: date | None = None
    patient_sex: Literal["M", "F", "O", "U", ""] = ""
    patient_location: str = Field("", max_length=64, description="current patient location (PV1-3)")
    admission_id: str = Field("", max_length=64)
    referring_physician: str = Field("", max_length=324, description="DICOM PN")
    requesting_physician: str = Field("", max_length=324, description="DICOM PN")
    placer_order_number: str = Field(min_length=1, max_length=64)
    placer_issuer: str = Field("", max_length=64)
    filler_order_number: str = Field("", max_length=64)
    filler_issuer: str = Field("", max_length=64)
    accession_number: str = Field(min_length=1, max_length=16)
    requested_procedure_id: str = Field("", max_length=16, description="default: the accession number")
    study_instance_uid: str = Field("", max_length=64, description="default: generated (a stable UID)")
    procedure_code: Code | None = None
    protocol_code: Code | None = Field(None, description="default: the procedure code")
    sps_id: str = Field("", max_length=16, description="Scheduled Procedure Step ID; default: the accession "
                                                       "number")
    modality: str = Field(min_length=1, max_length=16)
    station_ae_title: str = Field("", max_length=16)
    station_name: str = Field("", max_length=16)
    location: str = Field("", max_length=16, description="Scheduled Procedure Step Location (room)")
    scheduled_start: datetime = Field(description="ISO date-time; without a zone it is the broker's local time")
    priority: Literal["STAT", "HIGH", "ROUTINE", "MEDIUM"] = "ROUTINE"


class StepResult(BaseModel):
    message_id: int = Field(description="the archive row of the HL7 message the request became")
    control_id: str
    status: str = Field(description="accepted")
    procedures: list[ProcedureSummary] = Field(description="the order's procedures after the change")


_REFUSED: dict[int | str, dict[str, Any]] = {422: {"description": "refused: detail names the body field"},
            409: {"description": "duplicate order or step"}, 404: {"description": "unknown step or order"}}


@router.post("", response_model=StepResult, status_code=201, summary="Schedule a new step (new order)",
             responses=_REFUSED)
async def create(request: Request, body: StepIn, caller: WriteAccess) -> Any:
    return await asyncio.to_thread(_apply, request, "NW", body, caller, 201)


@router.put("/{step_id}", response_model=StepResult, summary="Change a step (its order is replaced, ORC XO)",
            responses=_REFUSED)
async def change(request: Request, step_id: Annotated[int, Path()], body: StepIn, caller: WriteAccess) -> Any:
    def run() -> Any:
        stored = _stored(request, step_id)
        if stored.order_steps > 1:
            raise HTTPException(409, f"step {step_id}'s order has {stored.order_steps} steps; a change over HTTP "
                                     "replaces the whole order, so change it from the RIS")
        for name in ("placer_order_number", "placer_issuer", "filler_order_number", "filler_issuer"):
            given = getattr(body, name)
            if given and given != getattr(stored, name):
                _refuse(422, name, f"{name} cannot change (the step's order has {getattr(stored, name)!r})")
        for name, current in (("study_instance_uid", stored.study_instance_uid), ("sps_id", stored.sps_id)):
            if getattr(body, name) and getattr(body, name) != current:
                _refuse(422, name, f"{name} identifies the step and cannot change ({current!r})")
        fixed = body.model_copy(update={
            "placer_order_number": stored.placer_order_number, "placer_issuer": stored.placer_issuer,
            "filler_order_number": stored.filler_order_number, "filler_issuer": stored.filler_issuer,
            "study_instance_uid": stored.study_instance_uid, "sps_id": stored.sps_id})
        return _apply(request, "XO", fixed, caller, 200)

    return await asyncio.to_thread(run)


@router.delete("/{step_id}", response_model=StepResult, summary="Cancel a step (its order, ORC CA)",
               responses=_REFUSED)
async def cancel(request: Request, step_id: int, caller: WriteAccess) -> Any:
    def run() -> Any:
        stored = _stored(request, step_id)
        values: dict[str, Any] = {name: "" for name in StepIn.model_fields}
        values.update(patient_birth_date=None, procedure_code=None, protocol_code=None, priority="ROUTINE",
                      scheduled_start=None, patient_id=stored.patient_id, issuer_of_patient_id=stored.issuer,
                      placer_order_number=stored.placer_order_number, placer_issuer=stored.placer_issuer,
                      filler_order_number=stored.filler_order_number, filler_issuer=stored.filler_issuer)
        body = StepIn.model_construct(**values)
        return _apply(request, "CA", body, caller, 200)

    return await asyncio.to_thread(run)


def _stored(request: Request, step_id: int) -> Any:
    with request.app.state.engine.connect() as db:
        row = db.execute(
            select(STEPS.c.id, STEPS.c.sps_id, STEPS.c.study_instance_uid, PROCEDURES.c.order_fk,
                   ORDERS.c.placer_order_number, ORDERS.c.placer_issuer, ORDERS.c.filler_order_number,
                   ORDERS.c.filler_issuer, PATIENTS.c.patient_id, PATIENTS.c.issuer)
            .join(PROCEDURES, PROCEDURES.c.id == STEPS.c.procedure_fk)
            .join(ORDERS, ORDERS.c.id == PROCEDURES.c.order_fk)
            .join(PATIENTS, PATIENTS.c.id == ORDERS.c.patient_fk).where(STEPS.c.id == step_id)).first()
        if row is None:
            raise HTTPException(404, f"no step {step_id}")
        count = len(list(db.execute(select(STEPS.c.id).join(PROCEDURES, PROCEDURES.c.id == STEPS.c.procedure_fk)
                                    .where(PROCEDURES.c.order_fk == row.order_fk))))
    return _Stored(row, count)


class _Stored:
    def __init__(self, row: Any, order_steps: int) -> None:
        self.__dict__.update(row._asdict())
        self.order_steps = order_steps


def _refuse(status: int, field: str, text: str, code: str = "", message_id: int | None = None) -> None:
    detail: dict[str, Any] = {"loc": ["body", field] if field else ["body"], "msg": text,
                              "type": f"hl7_{code}" if code else "value_error"}
    raise HTTPException(status, [detail] if message_id is None else [{**detail, "message_id": message_id}])


def _apply(request: Request, control: str, body: StepIn, caller: Caller, success: int) -> Any:
    control_id = new_control_id()
    raw = order_message(control, body, control_id, datetime.now())
    source = Source(caller.label, request.client.host if request.client else "", "http")
    outcome = submit(request.app.state.intake(), raw, SENDER, control_id, f"http {caller.label}", source)
    log.info("web.order_control", order_control=control, message_id=outcome.message_id, outcome=outcome.status,
             token=caller.label)
    if not outcome.accepted:
        raise _refusal(outcome)
    with request.app.state.engine.connect() as db:
        pks = [r.id for r in db.execute(
            select(PROCEDURES.c.id).join(ORDERS, ORDERS.c.id == PROCEDURES.c.order_fk).where(
                ORDERS.c.placer_order_number == body.placer_order_number,
                ORDERS.c.placer_issuer == body.placer_issuer))]
        procedures = summaries(db, pks)
    result = StepResult(message_id=outcome.message_id, control_id=control_id, status=outcome.status,
                        procedures=[ProcedureSummary(**p) for p in procedures])
    return JSONResponse(result.model_dump(), status_code=success)


def _refusal(outcome: Outcome) -> HTTPException:
    details = []
    status = 422
    for problem in outcome.problems or []:
        field = FIELD_OF_LOCATION.get(problem.location.split(".")[0], "")
        details.append({"loc": ["body", field] if field else ["body"], "msg": problem.text,
                        "type": f"hl7_{problem.code}", "hl7_location": problem.location,
                        "message_id": outcome.message_id})
        status = STATUS_OF_CODE.get(problem.code, status)
    if not details:
        details.append({"loc": ["body"], "msg": outcome.error or outcome.status, "type": "hl7",
                        "message_id": outcome.message_id})
    if status == 422 and any(d["type"] == "hl7_207" for d in details):
        status = 500
    return HTTPException(status, details)


# --- the HL7 message ------------------------------------------------------------------------------------
def _esc(text: str) -> str:
    """Text as HL7 field content: a delimiter in it (``&`` in "SMITH&JONES") is a character, not structure."""
    return escape(text)


def _components(*parts: str) -> str:
    return "^".join(_esc(p) for p in parts).rstrip("^")


def _pn_to_xcn(name: str) -> str:
    return ("^" + xpn_field(name)) if name else ""


def _code(code: Code | None) -> str:
    return _components(code.value, code.meaning, code.scheme) if code else ""


def local_time(moment: datetime) -> datetime:
    """A date-time with a zone as the broker's local time (DICOM start dates and times are local)."""
    return moment.astimezone().replace(tzinfo=None) if moment.tzinfo is not None else moment


def order_message(control: str, body: StepIn, control_id: str, now: datetime) -> bytes:
    """The OMI^O23 for ORC-1 ``control`` (NW, XO, CA) carrying ``body``, encoded in UTF-8."""
    stamp = now.strftime("%Y%m%d%H%M%S")
    placer = _components(body.placer_order_number, body.placer_issuer)
    filler = _components(body.filler_order_number, body.filler_issuer)
    segments = [
        f"MSH|^~\\&|{SENDING_APPLICATION}|{SENDING_FACILITY}|WLBROKER||{stamp}||OMI^O23^OMI_O23|{control_id}|P|2.5.1"
        "||||||UNICODE UTF-8",
        f"PID|1||{_components(body.patient_id, '', '', body.issuer_of_patient_id)}||{xpn_field(body.patient_name)}"
        f"||{body.patient_birth_date.strftime('%Y%m%d') if body.patient_birth_date else ''}|{body.patient_sex}",
    ]
    if control == "CA":
        segments.append(f"ORC|CA|{placer}|{filler}||CA")
    else:
        start = local_time(body.scheduled_start).strftime("%Y%m%d%H%M%S")
        segments += [
            f"PV1|1||{_esc(body.patient_location)}|||||{_pn_to_xcn(body.referring_physician)}"
            f"|||||||||||{_esc(body.admission_id)}",
            f"ORC|{control}|{placer}|{filler}||SC||||{stamp}",
            f"TQ1|1||||||{start}||{PRIORITY[body.priority]}",
            f"OBR|1|{placer}|{filler}|{_code(body.procedure_code)}||||||||||||{_pn_to_xcn(body.requesting_physician)}"
            f"||||||||{_esc(body.modality)}",
            f"IPC|{_esc(body.accession_number)}|{_esc(body.requested_procedure_id)}|{_esc(body.study_instance_uid)}"
            f"|{_esc(body.sps_id)}|{_esc(body.modality)}|{_code(body.protocol_code or body.procedure_code)}"
            f"|{_esc(body.station_name)}|{_esc(body.location)}|{_esc(body.station_ae_title)}",
        ]
    return ("\r".join(segments) + "\r").encode("utf-8")
