"""The procedure state machine.

A requested procedure moves forward through these states; every change is stored in
``procedure_transitions`` with its time and cause.

=================  ==========================================================================
From               Allowed to
=================  ==========================================================================
SCHEDULED          ARRIVED, STARTED, COMPLETED, DISCONTINUED, IMAGES AVAILABLE, CANCELED
ARRIVED            STARTED, COMPLETED, DISCONTINUED, IMAGES AVAILABLE, CANCELED
STARTED            COMPLETED, DISCONTINUED, IMAGES AVAILABLE
COMPLETED          IMAGES AVAILABLE, ARCHIVED, COMMIT FAILED
DISCONTINUED       IMAGES AVAILABLE, ARCHIVED, COMMIT FAILED
IMAGES AVAILABLE   ARCHIVED, COMMIT FAILED
COMMIT FAILED      ARCHIVED (a later commitment succeeded)
ARCHIVED           (final)
CANCELED           (final; the order was cancelled before it started, HL7 CA/OC)
=================  ==========================================================================

Skipping forward is allowed because the real world does it: a modality starts without an arrival
message (SCHEDULED -> STARTED), an archive sends its IAN before the modality's MPPS COMPLETED
(STARTED -> IMAGES AVAILABLE), an MPPS is created already COMPLETED. Going backward (or sideways
between COMPLETED and DISCONTINUED) is never applied: it is logged and ignored, never raised to the
modality, because a late or repeated event must not undo what a later one established. Reaching the
state the procedure is already in is a silent no-op.
"""

from __future__ import annotations

from enum import StrEnum


class ProcedureState(StrEnum):
    """States of a requested procedure."""

    SCHEDULED = "SCHEDULED"
    ARRIVED = "ARRIVED"
    STARTED = "STARTED"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"
    IMAGES_AVAILABLE = "IMAGES AVAILABLE"
    ARCHIVED = "ARCHIVED"
    COMMIT_FAILED = "COMMIT FAILED"
    CANCELED = "CANCELED"


S = ProcedureState
ALLOWED: dict[ProcedureState, frozenset[ProcedureState]] = {
    S.SCHEDULED: frozenset({S.ARRIVED, S.STARTED, S.COMPLETED, S.DISCONTINUED, S.IMAGES_AVAILABLE, S.CANCELED}),
    S.ARRIVED: frozenset({S.STARTED, S.COMPLETED, S.DISCONTINUED, S.IMAGES_AVAILABLE, S.CANCELED}),
    S.STARTED: frozenset({S.COMPLETED, S.DISCONTINUED, S.IMAGES_AVAILABLE}),
    S.COMPLETED: frozenset({S.IMAGES_AVAILABLE, S.ARCHIVED, S.COMMIT_FAILED}),
    S.DISCONTINUED: frozenset({S.IMAGES_AVAILABLE, S.ARCHIVED, S.COMMIT_FAILED}),
    S.IMAGES_AVAILABLE: frozenset({S.ARCHIVED, S.COMMIT_FAILED}),
    S.COMMIT_FAILED: frozenset({S.ARCHIVED}),
    S.ARCHIVED: frozenset(),
    S.CANCELED: frozenset(),
}

# The procedure state a scheduled step's status (SPS Status, set by HL7 or MPPS) moves it to.
FROM_STEP_STATUS: dict[str, ProcedureState] = {
    "ARRIVED": S.ARRIVED,
    "STARTED": S.STARTED,
    "COMPLETED": S.COMPLETED,
    "DISCONTINUED": S.DISCONTINUED,
    "CANCELED": S.CANCELED,
}


def is_allowed(current: str, target: str) -> bool:
    """Whether a procedure in ``current`` may move to ``target`` (unknown states: never)."""
    try:
        return ProcedureState(target) in ALLOWED[ProcedureState(current)]
    except ValueError:
        return False
