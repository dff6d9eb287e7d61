"""Running an HL7 message through the broker's own HL7 intake from HTTP, and reading back its outcome.

Create / change / cancel over HTTP and the replay of an archived message both go through
:class:`broker.intake.service.Intake`, so they have exactly the effects and validation of the same message
on the MLLP port: archive row, patient / order / step rows, procedure state, outbox events, ACK stored.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from broker.audit.events import Source
from broker.intake.service import Intake
from broker.mapping.rules import load_mappings
from broker.store.tables import InboundMessage, table_of

MESSAGES = table_of(InboundMessage)


@dataclass(frozen=True)
class Problem:
    """One problem of the message as the intake recorded it: HL7 error code, location, text."""

    code: str
    location: str
    text: str


@dataclass
class Outcome:
    """What the intake did with a message."""

    message_id: int
    status: str  # accepted, error, rejected, duplicate
    ack_code: str
    error: str
    problems: list[Problem] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.ack_code == "AA"


def new_control_id(prefix: str = "API") -> str:
    """A fresh MSH-10 for a message the broker writes itself (20 characters at most)."""
    return f"{prefix}{uuid.uuid4().hex[:20 - len(prefix)].upper()}"


def submit(intake: Intake, raw: bytes, sender: str, control_id: str, peer: str,
           source: Source | None = None) -> Outcome:
    """Hand ``raw`` to the intake (as the listener would) and read its archive row back. ``source``: who
    asks, as the audit trail names them (the token's label and the client's address)."""
    intake.handle(raw, peer[:100], source)
    with intake.engine.connect() as db:
        row = db.execute(select(MESSAGES.c.id, MESSAGES.c.status, MESSAGES.c.ack_code, MESSAGES.c.error)
                         .where(MESSAGES.c.sender == sender[:200], MESSAGES.c.control_id == control_id[:64])
                         .order_by(MESSAGES.c.id.desc()).limit(1)).one()
    return Outcome(row.id, row.status, row.ack_code, row.error, parse_problems(row.error))


def parse_problems(error: str) -> list[Problem]:
    """The archive's error text (``"101 PID-3: text; 205 ORC-2: text"``) as problems."""
    problems = []
    for part in (p.strip() for p in error.split("; ") if p.strip()):
        code, _, rest = part.partition(" ")
        location, colon, text = rest.partition(": ")
        if code.endswith(":") or not colon:  # "207: TypeError: ..." has no location
            code, location, text = code.rstrip(":"), "", rest
        problems.append(Problem(code, location if location and location[:1].isalpha() else "", text))
    return problems


def reload_mappings(intake: Intake, mappings_dir: Any) -> None:
    """Read the mapping files again (a replay is usually made after fixing one)."""
    intake.mappings = load_mappings(mappings_dir)


def archived_message(engine: Engine, message_id: int) -> Any:
    """The archive row of ``message_id`` (or None)."""
    with engine.connect() as db:
        return db.execute(select(MESSAGES).where(MESSAGES.c.id == message_id)).first()
