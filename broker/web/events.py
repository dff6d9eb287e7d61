"""``/api/events``: the outbox events that failed after every attempt, and putting one back to pending
(the same as ``broker events failed`` / ``broker events retry``)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from broker.reports import failed_event_rows, retry_event
from broker.web.auth import ReadAccess, WriteAccess

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/api/events", tags=["events"])


class FailedEvent(BaseModel):
    id: int
    event_id: str
    kind: str = Field(description="ris.status, mpps.forward, stgcmt.request, ...")
    attempts: int
    last_error: str
    created_at: str
    ordering_key: str


class Retried(BaseModel):
    id: str
    status: str = Field(description="pending: the relay will run it again")


@router.get("/failed", response_model=list[FailedEvent], summary="Events that failed after every attempt")
async def failed(request: Request, _: ReadAccess, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                 offset: Annotated[int, Query(ge=0)] = 0) -> list[dict[str, Any]]:
    rows = await asyncio.to_thread(failed_event_rows, request.app.state.engine, limit, offset)
    return [{**row._asdict(), "created_at": row.created_at.isoformat(timespec="seconds")} for row in rows]


@router.post("/{event}/retry", response_model=Retried, summary="Run a failed event again (attempts reset)",
             responses={404: {"description": "no failed event with this id or event id"}})
async def retry(request: Request, event: str, caller: WriteAccess) -> Retried:
    if not await asyncio.to_thread(retry_event, request.app.state.engine, event):
        raise HTTPException(404, f"no failed event {event}")
    log.info("web.event_retried", event_ref=event, token=caller.label)
    return Retried(id=event, status="pending")
