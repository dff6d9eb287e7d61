"""The UPS state table (spec section 5, PS3.4 Table CC.1.1-2) as the pure functions decide it."""

from __future__ import annotations

import pytest

from broker.domain.states import StepStatus
from broker.domain.ups_states import (
    ALREADY_CANCELED,
    ALREADY_COMPLETED,
    ALREADY_IN_PROGRESS,
    MAY_NO_LONGER_BE_UPDATED,
    NO_SUCH_UPS,
    NOT_IN_PROGRESS,
    ONLY_SCHEDULED_BY_N_CREATE,
    SUCCESS,
    WRONG_TRANSACTION_UID,
    Decision,
    UpsState,
    decide_change,
    decide_set,
    step_status_for,
    ups_state,
)

S, P, C, X = UpsState.SCHEDULED, UpsState.IN_PROGRESS, UpsState.COMPLETED, UpsState.CANCELED
UID, OTHER = "1.2.3", "1.2.4"


@pytest.mark.parametrize(("current", "target", "given", "stored", "expected"), [
    (None, P, UID, "", Decision(status=NO_SUCH_UPS)),
    (S, P, UID, "", Decision(action="claim")),
    (P, P, OTHER, UID, Decision(status=ALREADY_IN_PROGRESS)),
    (C, P, OTHER, UID, Decision(status=MAY_NO_LONGER_BE_UPDATED)),
    (X, P, OTHER, "", Decision(status=MAY_NO_LONGER_BE_UPDATED)),
    (S, C, UID, "", Decision(status=NOT_IN_PROGRESS)),
    (S, X, UID, "", Decision(status=NOT_IN_PROGRESS)),
    (S, C, "", "", Decision(status=WRONG_TRANSACTION_UID)),
    (P, C, UID, UID, Decision(action="complete")),
    (P, X, UID, UID, Decision(action="cancel")),
    (P, C, OTHER, UID, Decision(status=WRONG_TRANSACTION_UID)),
    (P, C, "", UID, Decision(status=WRONG_TRANSACTION_UID)),
    (C, C, UID, UID, Decision(status=ALREADY_COMPLETED)),
    (C, X, UID, UID, Decision(status=MAY_NO_LONGER_BE_UPDATED)),
    (C, C, OTHER, UID, Decision(status=WRONG_TRANSACTION_UID)),
    (X, C, UID, UID, Decision(status=MAY_NO_LONGER_BE_UPDATED)),
    (X, X, UID, UID, Decision(status=ALREADY_CANCELED)),
    (X, X, OTHER, UID, Decision(status=WRONG_TRANSACTION_UID)),
    (S, S, "", "", Decision(status=ONLY_SCHEDULED_BY_N_CREATE)),
    (P, S, UID, UID, Decision(status=ONLY_SCHEDULED_BY_N_CREATE)),
    (C, S, UID, UID, Decision(status=ONLY_SCHEDULED_BY_N_CREATE)),
])
def test_change_state(current: UpsState | None, target: UpsState, given: str, stored: str,
                      expected: Decision) -> None:
    assert decide_change(current, target, given, stored) == expected


def test_n_set_needs_the_transaction_uid_only_while_in_progress() -> None:
    assert decide_set(None, "", "") == NO_SUCH_UPS
    assert decide_set(S, "", "") == SUCCESS
    assert decide_set(S, UID, "") == WRONG_TRANSACTION_UID
    assert decide_set(P, UID, UID) == SUCCESS
    assert decide_set(P, OTHER, UID) == WRONG_TRANSACTION_UID
    assert decide_set(P, "", UID) == WRONG_TRANSACTION_UID
    assert decide_set(C, UID, UID) == MAY_NO_LONGER_BE_UPDATED
    assert decide_set(X, UID, UID) == MAY_NO_LONGER_BE_UPDATED


def test_one_model_two_views() -> None:
    assert [ups_state(s) for s in StepStatus] == [S, S, S, P, P, C, X, X]
    assert step_status_for(P, S) == StepStatus.STARTED
    assert step_status_for(C, P) == StepStatus.COMPLETED
    assert step_status_for(X, S) == StepStatus.CANCELED
    assert step_status_for(X, P) == StepStatus.DISCONTINUED
