"""``/api/procedures``: the list with filters and paging, one procedure with its timeline, and its
worklist items as DICOM JSON (PS3.18 F.2, exactly what a C-FIND returns the content of)."""

from __future__ import annotations

import asyncio
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from broker.reports import procedure_details
from broker.web.access_audit import note_patients, patient_ref
from broker.web.auth import ReadAccess
from broker.web.listing import PROCEDURES, STEPS, ProcedureFilter, list_procedures, summaries

router = APIRouter(prefix="/api", tags=["procedures"])
DICOM_JSON = "application/dicom+json"


class StepSummary(BaseModel):
    id: int
    sps_id: str = Field(description="Scheduled Procedure Step ID")
    status: str = Field(description="SPS status: SCHEDULED, ARRIVED, READY, STARTED, COMPLETED, ...")
    modality: str
    station_ae_title: str
    station_name: str
    location: str
    scheduled_start: str | None = Field(description="ISO date-time, local time of the broker")


class ProcedureSummary(BaseModel):
    id: int
    accession_number: str
    requested_procedure_id: str
    study_instance_uid: str
    description: str
    state: str = Field(description="procedure state: SCHEDULED, ARRIVED, STARTED, COMPLETED, DISCONTINUED, "
                                   "IMAGES AVAILABLE, ARCHIVED, COMMIT FAILED, CANCELED")
    ordered_at: str | None = Field(description="when the order was received")
    updated_at: str | None
    placer_order_number: str
    filler_order_number: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str = Field(description="DICOM PN (FAMILY^GIVEN^...)")
    modality: str = Field(description="the first step's modality")
    room: str = Field(description="the first step's station name, else location, else station AE title")
    scheduled_start: str | None
    steps: list[StepSummary]


class ProcedurePage(BaseModel):
    total: int = Field(description="procedures matching the filters, over all pages")
    limit: int
    offset: int
    items: list[ProcedureSummary]


class TimelineEntry(BaseModel):
    id: int
    at: str
    from_: str = Field(alias="from")
    to: str
    cause: str = Field(description="the message or event that made the change")
    event: str = Field(description="event kind and reference: 'hl7 <MSH-10>', 'mpps <SOP Instance UID>', ...")


class MppsSummary(BaseModel):
    sop_instance_uid: str
    status: str


class CommitmentSummary(BaseModel):
    transaction_uid: str
    status: str
    reason: str


class ProcedureDetail(ProcedureSummary):
    timeline: list[TimelineEntry] = Field(description="every state change, oldest first; the order's "
                                                      "arrival (SCHEDULED) is ordered_at")
    mpps: list[MppsSummary]
    commitments: list[CommitmentSummary]


@router.get("/procedures", response_model=ProcedurePage, summary="List procedures")
async def procedures(
    request: Request, _: ReadAccess,
    day: Annotated[date | None, Query(alias="date", description="scheduled day of a step, YYYY-MM-DD")] = None,
    modality: Annotated[str, Query(description="a step's modality, e.g. CT")] = "",
    station: Annotated[str, Query(description="a step's station AE title, station name or location")] = "",
    status: Annotated[list[str] | None, Query(description="procedure state(s); repeat or comma-separate")] = None,
    patient: Annotated[str, Query(description="Patient ID, or the start of the patient's name")] = "",
    accession: Annotated[str, Query(description="Accession Number")] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    states = tuple(s.strip().upper() for v in status or [] for s in v.split(",") if s.strip())
    wanted = ProcedureFilter(day, modality.strip(), station.strip(), states, patient.strip(), accession.strip())

    def read() -> tuple[int, list[dict[str, Any]]]:
        with request.app.state.engine.connect() as db:
            return list_procedures(db, wanted, limit, offset)

    total, items = await asyncio.to_thread(read)
    note_patients(request, (patient_ref(i["patient_id"], i["issuer_of_patient_id"]) for i in items))
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.get("/procedures/{procedure_id}", response_model=ProcedureDetail, summary="One procedure and its timeline",
            responses={404: {"description": "no such procedure"}})
async def procedure(request: Request, procedure_id: int, _: ReadAccess) -> dict[str, Any]:
    def read() -> dict[str, Any] | None:
        with request.app.state.engine.connect() as db:
            found = summaries(db, [procedure_id])
        if not found:
            return None
        [detail] = procedure_details(request.app.state.engine, PROCEDURES.c.id == procedure_id)
        return {**found[0], "timeline": detail["timeline"], "mpps": detail["mpps"],
                "commitments": detail["commitments"]}

    found = await asyncio.to_thread(read)
    if found is None:
        raise HTTPException(404, f"no procedure {procedure_id}")
    note_patients(request, [patient_ref(found["patient_id"], found["issuer_of_patient_id"])])
    return found


@router.get("/procedures/{procedure_id}/worklist", summary="The procedure's worklist items as DICOM JSON",
            response_class=JSONResponse,
            responses={200: {"content": {DICOM_JSON: {}}, "description": "a JSON array of DICOM JSON datasets "
                                                                         "(PS3.18 F.2), one per step"},
                       404: {"description": "no such procedure"}})
async def worklist_items(request: Request, procedure_id: int, _: ReadAccess) -> JSONResponse:
    def read() -> list[Any] | None:
        with request.app.state.engine.connect() as db:
            if db.execute(select(PROCEDURES.c.id).where(PROCEDURES.c.id == procedure_id)).first() is None:
                return None
            return [row.item for row in db.execute(select(STEPS.c.item).where(STEPS.c.procedure_fk == procedure_id)
                                                   .order_by(STEPS.c.id))]

    items = await asyncio.to_thread(read)
    if items is None:
        raise HTTPException(404, f"no procedure {procedure_id}")
    note_patients(request, (_item_patient(item) for item in items))
    return JSONResponse(items, media_type=DICOM_JSON)


@router.get("/steps/{step_id}/worklist-item", summary="One step's worklist item as DICOM JSON",
            response_class=JSONResponse,
            responses={200: {"content": {DICOM_JSON: {}}, "description": "a DICOM JSON dataset (PS3.18 F.2)"},
                       404: {"description": "no such step"}})
async def worklist_item(request: Request, step_id: int, _: ReadAccess) -> JSONResponse:
    def read() -> Any:
        with request.app.state.engine.connect() as db:
            return db.execute(select(STEPS.c.item).where(STEPS.c.id == step_id)).scalar_one_or_none()

    item = await asyncio.to_thread(read)
    if item is None:
        raise HTTPException(404, f"no step {step_id}")
    note_patients(request, [_item_patient(item)])
    return JSONResponse(item, media_type=DICOM_JSON)


def _item_patient(item: Any) -> str:
    """PatientID (0010,0020) with IssuerOfPatientID (0010,0021) of a DICOM JSON worklist item."""
    def first(tag: str) -> str:
        values = (item.get(tag) or {}).get("Value") or [""]
        return str(values[0])

    return patient_ref(first("00100020"), first("00100021"))
