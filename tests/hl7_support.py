"""Helpers for tests that send HL7 and read the stored worklist."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from broker.dicom_json import tag_of, value
from broker.domain.worklist_item import step_item
from broker.hl7.message import Message, parse
from broker.store.tables import ScheduledStep


def ack_of(reply: bytes, codec: str = "latin-1") -> Message:
    """The parsed ACK."""
    return parse(reply.decode(codec))


def msa_code(reply: bytes, codec: str = "latin-1") -> str:
    message = ack_of(reply, codec)
    return message.value(message.first("MSA"), 1)


def err_fields(reply: bytes) -> list[tuple[str, str, str]]:
    """(location, code, full segment) of each ERR, for v2.3.1 (ERR-1 ELD) and v2.5 (ERR-2/ERR-3)."""
    message = ack_of(reply)
    out = []
    for err in message.all("ERR"):
        if message.value(err, 2):  # v2.5
            seg, field = message.value(err, 2, 1), message.value(err, 2, 3)
            comp = message.value(err, 2, 5)
            code = message.value(err, 3, 1)
        else:
            seg, field, comp = message.value(err, 1, 1), message.value(err, 1, 3), ""
            code = message.value(err, 1, 4, 1)
        location = f"{seg}-{field}" + (f".{comp}" if comp else "")
        out.append((location, code, "|".join(err.fields)))
    return out


def steps(sessions: sessionmaker[Session]) -> list[ScheduledStep]:
    with sessions() as session:
        return list(session.scalars(select(ScheduledStep).order_by(ScheduledStep.id)))


def item_value(step: ScheduledStep, keyword: str) -> str:
    return value(step.item, keyword)


def sps_value(step: ScheduledStep, keyword: str) -> str:
    return value(step_item(step.item), keyword)


def code_item(step: ScheduledStep, sequence_keyword: str, in_step: bool = True) -> dict[str, Any]:
    source = step_item(step.item) if in_step else step.item
    items = source[tag_of(sequence_keyword)]["Value"]
    return {k: value(items[0], k) for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")}


def with_control_id(raw: bytes, control_id: str) -> bytes:
    """The message with MSH-10 replaced (a new message, not a repeat)."""
    fields = raw.split(b"\r", 1)[0].split(b"|")
    old = fields[9]
    return raw.replace(b"|" + old + b"|", b"|" + control_id.encode() + b"|", 1)
