"""HL7 application errors: each becomes one ERR segment of the ACK (HL7 table 0357 codes)."""

from __future__ import annotations

from dataclasses import dataclass

# HL7 table 0357, message error condition codes.
SEGMENT_SEQUENCE_ERROR = "100"
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
TABLE_VALUE_NOT_FOUND = "103"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT_CODE = "201"
UNKNOWN_KEY = "204"
DUPLICATE_KEY = "205"
APPLICATION_INTERNAL_ERROR = "207"

ERROR_TEXT = {
    SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    REQUIRED_FIELD_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error",
    TABLE_VALUE_NOT_FOUND: "Table value not found",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    UNKNOWN_KEY: "Unknown key identifier",
    DUPLICATE_KEY: "Duplicate key identifier",
    APPLICATION_INTERNAL_ERROR: "Application internal error",
}


@dataclass(frozen=True)
class Problem:
    """One problem with a message: where (segment, its sequence, field, component) and what."""

    code: str
    text: str
    segment: str = ""
    sequence: int = 1
    field: int = 0
    component: int = 0

    @property
    def location(self) -> str:
        """``PID-7`` or ``ORC-7.4``: how an integrator names the field."""
        if not self.segment:
            return ""
        where = f"{self.segment}-{self.field}" if self.field else self.segment
        return f"{where}.{self.component}" if self.component else where


class MessageError(Exception):
    """Processing stopped on one or more problems; ``reject`` selects AR (message refused) over AE."""

    def __init__(self, problems: list[Problem], *, reject: bool = False) -> None:
        super().__init__("; ".join(f"{p.location or 'message'}: {p.text}" for p in problems))
        self.problems = problems
        self.reject = reject
