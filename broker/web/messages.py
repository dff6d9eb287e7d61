"""``/api/messages``: the inbound HL7 message archive: search, view, and replay a message.

A replay runs the stored bytes through the HL7 intake again, after the mapping files are read again
(the usual reason is a fixed mapping). The intake answers a repeated MSH-10 as a duplicate, so the
replayed copy gets the control ID ``<original>-R<n>`` (n = the replay's number); its archive row's
``peer`` says ``replay of #<id>``, so the archive shows what was replayed, when and by which token.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from broker.audit.events import Source
from broker.mapping.charsets import UnknownCharset, message_charset
from broker.web.auth import ReadAccess, WriteAccess
from broker.web.intake_bridge import MESSAGES, archived_message, reload_mappings, submit
from broker.web.steps import local_time
from broker.worklist_files.reading import dump

WORKLIST_FILE = "DICOM^WL"  # archive rows of worklist files (broker.worklist_files.intake.MESSAGE_TYPE)

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/api/messages", tags=["messages"])
REPLAY_PEER = "replay of #"


class MessageSummary(BaseModel):
    id: int
    received_at: str
    processed_at: str | None
    peer: str = Field(description="host:port of the sender, 'http ...' or 'replay of #<id> ...'")
    sender: str = Field(description="MSH-3^MSH-4")
    control_id: str = Field(description="MSH-10")
    message_type: str = Field(description="MSH-9, e.g. ORM^O01")
    status: str = Field(description="received, accepted, error, rejected, duplicate")
    ack_code: str
    error: str
    duplicate_of_id: int | None


class MessagePage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[MessageSummary]


class MessageDetail(MessageSummary):
    charset: str
    text: str = Field(description="the message decoded in its character set, segments separated by \\n")
    ack: list[str] = Field(description="the reply message(s) sent")
    replays: list[MessageSummary] = Field(description="replayed copies of this message")


class Replayed(BaseModel):
    message_id: int = Field(description="the archive row of the replayed copy")
    control_id: str
    status: str
    ack_code: str
    error: str


def _summary(row: Any) -> dict[str, Any]:
    return {"id": row.id, "received_at": row.received_at.isoformat(timespec="seconds"),
            "processed_at": row.processed_at.isoformat(timespec="seconds") if row.processed_at else None,
            "peer": row.peer, "sender": row.sender, "control_id": row.control_id,
            "message_type": row.message_type, "status": row.status, "ack_code": row.ack_code,
            "error": row.error, "duplicate_of_id": row.duplicate_of_id}


_SUMMARY_COLUMNS = [MESSAGES.c[name] for name in (
    "id", "received_at", "processed_at", "peer", "sender", "control_id", "message_type", "status", "ack_code",
    "error", "duplicate_of_id")]


@router.get("", response_model=MessagePage, summary="Search the inbound message archive (newest first)")
async def search(
    request: Request, _: ReadAccess,
    control_id: Annotated[str, Query(description="MSH-10")] = "",
    sender: Annotated[str, Query(description="MSH-3^MSH-4, or the start of it")] = "",
    message_type: Annotated[str, Query(description="e.g. ORM^O01, or ORM")] = "",
    status: Annotated[str, Query(description="received, accepted, error, rejected, duplicate")] = "",
    since: Annotated[datetime | None, Query(description="received at or after (ISO)")] = None,
    until: Annotated[datetime | None, Query(description="received before (ISO)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    conditions = []
    if control_id:
        conditions.append(MESSAGES.c.control_id == control_id)
    if sender:
        conditions.append(MESSAGES.c.sender.startswith(sender, autoescape=True))
    if message_type:
        conditions.append(MESSAGES.c.message_type.startswith(message_type, autoescape=True))
    if status:
        conditions.append(MESSAGES.c.status == status)
    if since:
        conditions.append(MESSAGES.c.received_at >= local_time(since))
    if until:
        conditions.append(MESSAGES.c.received_at < local_time(until))

    def read() -> tuple[int, list[Any]]:
        with request.app.state.engine.connect() as db:
            total = db.execute(select(func.count()).select_from(MESSAGES).where(*conditions)).scalar_one()
            rows = list(db.execute(select(*_SUMMARY_COLUMNS).where(*conditions)
                                   .order_by(MESSAGES.c.id.desc()).limit(limit).offset(offset)))
        return int(total), rows

    total, rows = await asyncio.to_thread(read)
    return {"total": total, "limit": limit, "offset": offset, "items": [_summary(r) for r in rows]}


@router.get("/{message_id}", response_model=MessageDetail, summary="One archived message, decoded, with its ACK",
            responses={404: {"description": "no such message"}})
async def view(request: Request, message_id: int, _: ReadAccess) -> dict[str, Any]:
    engine = request.app.state.engine

    def read() -> tuple[Any, list[Any]]:
        row = archived_message(engine, message_id)
        if row is None:
            return None, []
        with engine.connect() as db:
            replays = list(db.execute(select(*_SUMMARY_COLUMNS).where(
                MESSAGES.c.peer.startswith(f"{REPLAY_PEER}{message_id} ", autoescape=True)).order_by(MESSAGES.c.id)))
        return row, replays

    row, replays = await asyncio.to_thread(read)
    if row is None:
        raise HTTPException(404, f"no message {message_id}")
    codec = _codec(row.charset)
    ack = [part.decode(codec, errors="replace").replace("\r", "\n").rstrip("\n")
           for part in (row.ack or b"").split(b"\x1c") if part]
    if row.message_type.startswith(WORKLIST_FILE):  # a .wl file (broker.worklist_files): its DICOM dump
        text = dump(bytes(row.raw)) if row.raw else ""
    else:
        text = bytes(row.raw).decode(codec, errors="replace").replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    return {**_summary(row), "charset": row.charset, "ack": ack, "text": text,
            "replays": [_summary(r) for r in replays]}


@router.post("/{message_id}/replay", response_model=Replayed,
             summary="Process an archived message again (after a mapping fix)",
             responses={404: {"description": "no such message"},
                        409: {"description": "a worklist file: written into its folder again, not replayed"}})
async def replay(request: Request, message_id: int, caller: WriteAccess) -> Replayed:
    state = request.app.state
    row = await asyncio.to_thread(archived_message, state.engine, message_id)
    if row is None:
        raise HTTPException(404, f"no message {message_id}")
    if row.message_type.startswith(WORKLIST_FILE):
        raise HTTPException(409, "a worklist file is not replayed here: write it into its folder again "
                                 "(an unreadable one waits in the folder's .failed/)")

    def run() -> Replayed:
        with state.engine.connect() as db:
            earlier = db.execute(select(func.count()).select_from(MESSAGES).where(
                MESSAGES.c.peer.startswith(f"{REPLAY_PEER}{message_id} ", autoescape=True))).scalar_one()
        control_id = f"{row.control_id}-R{int(earlier) + 1}"
        intake = state.intake()
        reload_mappings(intake, state.settings.mappings_dir)
        # a replay is a Security Alert in the audit trail (see broker.intake.service)
        source = Source(caller.label, request.client.host if request.client else "", "http",
                        {"replay_of": str(message_id)})
        outcome = submit(intake, _with_control_id(bytes(row.raw), control_id), row.sender, control_id,
                         f"{REPLAY_PEER}{message_id} by {caller.label}", source)
        log.info("web.message_replayed", message_id=message_id, replay_id=outcome.message_id,
                 control_id=control_id, outcome=outcome.status, token=caller.label)
        return Replayed(message_id=outcome.message_id, control_id=control_id, status=outcome.status,
                        ack_code=outcome.ack_code, error=outcome.error)

    return await asyncio.to_thread(run)


def _codec(charset: str) -> str:
    try:
        return message_charset(charset, "8859/1").python_codec
    except UnknownCharset:
        return "latin-1"


def _with_control_id(raw: bytes, control_id: str) -> bytes:
    """``raw`` with MSH-10 replaced (the field separator is the byte after 'MSH')."""
    start = raw.find(b"MSH")
    separator = raw[start + 3:start + 4]
    end = min((i for i in (raw.find(b"\r", start), raw.find(b"\n", start)) if i >= 0), default=len(raw))
    fields = raw[start:end].split(separator)
    while len(fields) < 10:
        fields.append(b"")
    fields[9] = control_id.encode("ascii")
    return raw[:start] + separator.join(fields) + raw[end:]
