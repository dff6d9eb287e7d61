"""What a domain service answers to a DICOM edge: a DIMSE status and its optional details.

The edge copies these into the response (Status, Error Comment, Error ID, Offending Element,
Attribute List); the service never raises for something the peer did wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset

# DIMSE status codes (PS3.7 C) the services answer with.
SUCCESS = 0x0000
NO_SUCH_ATTRIBUTE = 0x0105
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121

# PS3.4 F.7.2.2: an N-SET on a PPS that is COMPLETED or DISCONTINUED.
MAY_NO_LONGER_BE_UPDATED = "Performed Procedure Step Object may no longer be updated"
ERROR_ID_MAY_NO_LONGER_BE_UPDATED = 0xA710


@dataclass(frozen=True)
class Outcome:
    """A DIMSE status with its details; ``offending`` holds tags as ints (e.g. 0x00400252)."""

    status: int
    error_comment: str | None = None
    error_id: int | None = None
    offending: tuple[int, ...] = ()
    attribute_list: Dataset | None = None

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


def failure(status: int, comment: str, offending: tuple[int, ...] = (), error_id: int | None = None) -> Outcome:
    """A failure outcome; the Error Comment is cut to the 64 characters of its LO VR."""
    return Outcome(status, comment[:64], error_id, offending)
