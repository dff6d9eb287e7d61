"""The UPS states, how they map onto SPS Status, and the state table of PS3.4 CC.1.1 as data.

Pure functions: given what is stored and what is asked, they say what to do or which status to
answer; the service applies the decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from broker.domain.states import StepStatus


class UpsState(StrEnum):
    """Procedure Step State (0074,1000)."""

    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"


FINAL_STATES = frozenset({UpsState.COMPLETED, UpsState.CANCELED})

# The UPS state a step status shows as (one model, two views).
FROM_STEP_STATUS: dict[str, UpsState] = {
    StepStatus.SCHEDULED: UpsState.SCHEDULED, StepStatus.ARRIVED: UpsState.SCHEDULED,
    StepStatus.READY: UpsState.SCHEDULED, StepStatus.STARTED: UpsState.IN_PROGRESS,
    StepStatus.DEPARTED: UpsState.IN_PROGRESS, StepStatus.COMPLETED: UpsState.COMPLETED,
    StepStatus.CANCELED: UpsState.CANCELED, StepStatus.DISCONTINUED: UpsState.CANCELED,
}


def ups_state(step_status: str) -> UpsState:
    """The UPS state of a step status (an unknown status shows as SCHEDULED)."""
    return FROM_STEP_STATUS.get(step_status, UpsState.SCHEDULED)


def step_status_for(target: UpsState, current: UpsState) -> StepStatus:
    """The step status a UPS change sets: a step canceled before it started is CANCELED, after it
    started DISCONTINUED (as the worklist and the RIS know those words)."""
    if target == UpsState.IN_PROGRESS:
        return StepStatus.STARTED
    if target == UpsState.COMPLETED:
        return StepStatus.COMPLETED
    if target == UpsState.CANCELED:
        return StepStatus.DISCONTINUED if current == UpsState.IN_PROGRESS else StepStatus.CANCELED
    return StepStatus.SCHEDULED


# DIMSE statuses of PS3.4 CC.2 (and the general ones the UPS operations use).
SUCCESS = 0x0000
ALREADY_CANCELED = 0xB304          # warning
ALREADY_COMPLETED = 0xB306         # warning
MAY_NO_LONGER_BE_UPDATED = 0xC300
WRONG_TRANSACTION_UID = 0xC301
ALREADY_IN_PROGRESS = 0xC302
ONLY_SCHEDULED_BY_N_CREATE = 0xC303
FINAL_STATE_NOT_MET = 0xC304
NO_SUCH_UPS = 0xC307
UNKNOWN_RECEIVING_AE = 0xC308
CREATE_NOT_SCHEDULED = 0xC309
NOT_IN_PROGRESS = 0xC310
CANNOT_CANCEL_COMPLETED = 0xC311
NOT_APPROPRIATE_FOR_INSTANCE = 0xC314

COMMENTS = {
    ALREADY_CANCELED: "The UPS is already in the requested state of CANCELED",
    ALREADY_COMPLETED: "The UPS is already in the requested state of COMPLETED",
    MAY_NO_LONGER_BE_UPDATED: "The UPS may no longer be updated",
    WRONG_TRANSACTION_UID: "The correct Transaction UID was not provided",
    ALREADY_IN_PROGRESS: "The UPS is already IN PROGRESS",
    ONLY_SCHEDULED_BY_N_CREATE: "The UPS may only become SCHEDULED via N-CREATE",
    FINAL_STATE_NOT_MET: "The UPS has not met final state requirements",
    NO_SUCH_UPS: "Specified SOP Instance UID does not exist",
    UNKNOWN_RECEIVING_AE: "Receiving AE-TITLE is unknown to this SCP",
    CREATE_NOT_SCHEDULED: "The provided value of UPS State was not SCHEDULED",
    NOT_IN_PROGRESS: "The UPS is not yet in the IN PROGRESS state",
    CANNOT_CANCEL_COMPLETED: "The UPS is already COMPLETED",
    NOT_APPROPRIATE_FOR_INSTANCE: "Specified action not appropriate for specified instance",
}

# What to do on N-ACTION Change UPS State once the Transaction UID is right: (current, target) ->
# "claim" / "complete" / "cancel" or the status to answer (PS3.4 Table CC.1.1-2, spec section 5).
CHANGE_STATE: dict[tuple[UpsState, UpsState], str | int] = {
    (UpsState.SCHEDULED, UpsState.IN_PROGRESS): "claim",
    (UpsState.IN_PROGRESS, UpsState.IN_PROGRESS): ALREADY_IN_PROGRESS,
    (UpsState.COMPLETED, UpsState.IN_PROGRESS): MAY_NO_LONGER_BE_UPDATED,
    (UpsState.CANCELED, UpsState.IN_PROGRESS): MAY_NO_LONGER_BE_UPDATED,
    (UpsState.SCHEDULED, UpsState.COMPLETED): NOT_IN_PROGRESS,
    (UpsState.SCHEDULED, UpsState.CANCELED): NOT_IN_PROGRESS,
    (UpsState.IN_PROGRESS, UpsState.COMPLETED): "complete",
    (UpsState.IN_PROGRESS, UpsState.CANCELED): "cancel",
    (UpsState.COMPLETED, UpsState.COMPLETED): ALREADY_COMPLETED,
    (UpsState.COMPLETED, UpsState.CANCELED): MAY_NO_LONGER_BE_UPDATED,
    (UpsState.CANCELED, UpsState.COMPLETED): MAY_NO_LONGER_BE_UPDATED,
    (UpsState.CANCELED, UpsState.CANCELED): ALREADY_CANCELED,
}

# N-ACTION Request Cancel by current state: "cancel" (SCHEDULED: canceled at once), "ask" (IN
# PROGRESS: the performer is told, event type 2) or the status to answer.
REQUEST_CANCEL: dict[UpsState, str | int] = {
    UpsState.SCHEDULED: "cancel", UpsState.IN_PROGRESS: "ask",
    UpsState.COMPLETED: CANNOT_CANCEL_COMPLETED, UpsState.CANCELED: ALREADY_CANCELED,
}


@dataclass(frozen=True)
class Decision:
    """What a change-state request leads to: an ``action`` to apply, or a ``status`` to answer."""

    action: str = ""
    status: int = SUCCESS


def decide_change(current: UpsState | None, target: UpsState, given_uid: str, stored_uid: str) -> Decision:
    """N-ACTION Change UPS State: the spec section 5 table, Transaction UID check included.

    Claiming (to IN PROGRESS) brings a new Transaction UID; every other change must carry the one the
    claim brought (C301), except that a SCHEDULED UPS asked to end with a Transaction UID is "not yet
    IN PROGRESS" (C310): it has no Transaction UID to be wrong about.
    """
    if current is None:
        return Decision(status=NO_SUCH_UPS)
    if target == UpsState.SCHEDULED:
        return Decision(status=ONLY_SCHEDULED_BY_N_CREATE)
    if target != UpsState.IN_PROGRESS:
        if current == UpsState.SCHEDULED:
            return Decision(status=NOT_IN_PROGRESS if given_uid else WRONG_TRANSACTION_UID)
        if not given_uid or given_uid != stored_uid:
            return Decision(status=WRONG_TRANSACTION_UID)
    verdict = CHANGE_STATE[(current, target)]
    return Decision(action=verdict) if isinstance(verdict, str) else Decision(status=verdict)


def decide_set(current: UpsState | None, given_uid: str, stored_uid: str) -> int:
    """N-SET: allowed (SUCCESS) or the failure. A SCHEDULED UPS is updated without a Transaction UID,
    an IN PROGRESS one only with the performer's; a final one no longer."""
    if current is None:
        return NO_SUCH_UPS
    if current in FINAL_STATES:
        return MAY_NO_LONGER_BE_UPDATED
    if current == UpsState.SCHEDULED:
        return WRONG_TRANSACTION_UID if given_uid else SUCCESS
    return SUCCESS if given_uid and given_uid == stored_uid else WRONG_TRANSACTION_UID


def is_warning(status: int) -> bool:
    return 0xB000 <= status <= 0xBFFF
