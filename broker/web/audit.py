"""``GET /api/audit``: the audit trail searched by time, patient, user and event, for the audit role only
(read and write tokens get 403: who looked at which patient is not for every reader)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from broker.audit.search import EVENTS, MAX_LIMIT, AuditFilter, event_code, search
from broker.audit.shipper import source_id
from broker.web.auth import AuditAccess

router = APIRouter(prefix="/api", tags=["audit"])


class AuditEntry(BaseModel):
    id: int
    recorded_at: str = Field(description="ISO date-time, local time of the broker")
    event: str = Field(description="application, order, patient, procedure, query or security")
    event_id: str = Field(description="EventID code (DCM)")
    event_type: str = Field(description="the first EventTypeCode's code, or empty")
    action: str = Field(description="EventActionCode: C, R, U, D or E")
    outcome: int = Field(description="EventOutcomeIndicator: 0, 4, 8 or 12")
    user_id: str = Field(description="the requestor: AE title, application^facility, or token <label>")
    host: str = Field(description="the requestor's address")
    patient_ids: list[str]
    delivered_at: str | None = Field(description="when it was sent to the Audit Record Repository")
    attempts: int
    xml: str = Field(description="the DICOM audit message (PS3.15 A.5.1)")


@router.get("/audit", summary="Search the audit trail (token role audit)", response_model=list[AuditEntry])
async def audit_trail(
    request: Request, _: AuditAccess,
    since: Annotated[datetime | None, Query(description="recorded at or after (ISO date-time, local)")] = None,
    until: Annotated[datetime | None, Query(description="recorded before (ISO date-time, local)")] = None,
    patient: Annotated[str, Query(max_length=200, description="Patient ID, with or without ^^^issuer")] = "",
    user: Annotated[str, Query(max_length=200, description="requestor UserID: AE title, token <label>, ...")] = "",
    event: Annotated[str, Query(description=f"one of {', '.join(EVENTS)}, or an EventID code")] = "",
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> list[dict[str, Any]]:
    if event:
        try:
            event_code(event)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
    settings = request.app.state.settings
    wanted = AuditFilter(since=_naive(since), until=_naive(until), patient=patient, user=user, event=event,
                         limit=limit)
    return await asyncio.to_thread(search, request.app.state.engine, wanted, source_id=source_id(settings),
                                   site_id=settings.audit_enterprise_site_id)


def _naive(moment: datetime | None) -> datetime | None:
    """The broker stores naive local times: an aware bound is converted to local time."""
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone().replace(tzinfo=None)
