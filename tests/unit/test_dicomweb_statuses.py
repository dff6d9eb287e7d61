"""The HTTP status and Warning of each UPS-RS transaction for each DIMSE status the UPS service answers
(PS3.18 Tables 11.4.3-1 to 11.8.3-2), so a client written against PS3.18 reads the refusal it expects."""

from __future__ import annotations

import pytest

from broker.domain.ups_states import COMMENTS
from broker.ups.service import ups_status
from broker.web.dicomweb.statuses import (
    ALREADY_CANCELED_TEXT,
    ALREADY_COMPLETED_TEXT,
    CANCEL_COMPLETED,
    INCONSISTENT_WITH_STATE,
    TRANSACTION_UID_INCORRECT,
    TRANSACTION_UID_MISSING,
    UPDATE_INCONSISTENT,
    UPDATE_NOT_CLAIMED,
    HttpAnswer,
    Transaction,
    answer,
)
from broker.workflow.outcome import Outcome, failure

CREATE, RETRIEVE, UPDATE = Transaction.CREATE, Transaction.RETRIEVE, Transaction.UPDATE
STATE, CANCEL = Transaction.CHANGE_STATE, Transaction.REQUEST_CANCELLATION


@pytest.mark.parametrize(("transaction", "code"), [(CREATE, 201), (RETRIEVE, 200), (UPDATE, 200), (STATE, 200),
                                                   (CANCEL, 202)])
def test_success_is_the_transactions_success_code_without_a_warning(transaction: Transaction, code: int) -> None:
    assert answer(transaction, Outcome(0x0000)) == HttpAnswer(code)


@pytest.mark.parametrize(("transaction", "status", "code", "warning"), [
    # Change State: the "already" warnings are successes with the standard's words
    (STATE, 0xB304, 200, ALREADY_CANCELED_TEXT),
    (STATE, 0xB306, 200, ALREADY_COMPLETED_TEXT),
    (CANCEL, 0xB304, 202, ALREADY_CANCELED_TEXT),
    # what contradicts the workitem's state is a conflict
    (STATE, 0xC300, 409, INCONSISTENT_WITH_STATE),
    (STATE, 0xC302, 409, INCONSISTENT_WITH_STATE),
    (STATE, 0xC304, 409, INCONSISTENT_WITH_STATE),
    (STATE, 0xC310, 409, INCONSISTENT_WITH_STATE),
    (CANCEL, 0xC311, 409, CANCEL_COMPLETED),
    # Update of a final workitem: 400 in Table 11.6.3-1
    (UPDATE, 0xC300, 400, UPDATE_INCONSISTENT),
    # asking for SCHEDULED, creating in another state: the request is wrong
    (STATE, 0xC303, 400, COMMENTS[0xC303]),
    (UPDATE, 0xC303, 400, COMMENTS[0xC303]),
    (CREATE, 0xC309, 400, COMMENTS[0xC309]),
    # no such workitem, whatever the transaction
    (RETRIEVE, 0xC307, 404, "The Target Workitem was not found."),
    (UPDATE, 0xC307, 404, "The Target Workitem was not found."),
    (STATE, 0xC307, 404, "The Target Workitem was not found."),
    (CANCEL, 0xC307, 404, "The Target Workitem was not found."),
])
def test_ups_statuses(transaction: Transaction, status: int, code: int, warning: str) -> None:
    http = answer(transaction, ups_status(status))
    assert (http.status_code, http.warning) == (code, warning)
    assert http.ok == (code < 300)
    if not http.ok:  # a refusal carries the service's reason for the body
        assert http.detail.startswith(COMMENTS[status])


def test_the_transaction_uid_is_missing_or_incorrect_as_the_request_had_one() -> None:
    wrong = ups_status(0xC301)
    assert answer(STATE, wrong) == HttpAnswer(400, TRANSACTION_UID_MISSING, COMMENTS[0xC301])
    assert answer(STATE, wrong, transaction_uid_given=True) == HttpAnswer(400, TRANSACTION_UID_INCORRECT,
                                                                          COMMENTS[0xC301])
    assert answer(UPDATE, wrong).warning == TRANSACTION_UID_MISSING
    assert answer(UPDATE, wrong, transaction_uid_given=True).warning == UPDATE_NOT_CLAIMED
    # a claim without a Transaction UID: the service answers 0120 naming it
    claim = failure(0x0120, "claiming needs a Transaction UID", (0x00081195,))
    assert answer(STATE, claim) == HttpAnswer(400, TRANSACTION_UID_MISSING, "claiming needs a Transaction UID")


@pytest.mark.parametrize("status", [0x0105, 0x0106, 0x0115, 0x0120, 0x0121])
def test_attribute_problems_are_bad_requests_that_say_which(status: int) -> None:
    outcome = failure(status, "missing: ProcedureStepLabel", (0x00741204,))
    for transaction in (CREATE, UPDATE, STATE, CANCEL):
        assert answer(transaction, outcome) == HttpAnswer(400, "missing: ProcedureStepLabel",
                                                          "missing: ProcedureStepLabel")


def test_a_duplicate_create_is_a_conflict() -> None:
    http = answer(CREATE, failure(0x0111, "a UPS with this SOP Instance UID exists"))
    assert (http.status_code, http.warning) == (409, "The Target Workitem already exists.")
    assert http.detail == "a UPS with this SOP Instance UID exists"


def test_a_database_failure_is_unavailable_and_another_processing_failure_a_server_error() -> None:
    assert answer(UPDATE, failure(0x0110, "database unavailable; please retry")).status_code == 503
    assert answer(CREATE, failure(0x0110, "attribute list cannot be stored: TypeError")).status_code == 500


def test_unknown_statuses_fall_into_their_class() -> None:
    assert answer(STATE, failure(0xC3FF, "something UPS-specific")).status_code == 409
    assert answer(STATE, failure(0xA700, "out of resources")).status_code == 500
    warned = answer(UPDATE, Outcome(0xB000, "coercion"))
    assert (warned.status_code, warned.warning) == (200, "coercion")


def test_the_warning_header_is_299_with_the_service_and_printable_ascii() -> None:
    assert HttpAnswer(200).warning_header("broker:8080") == {}
    assert HttpAnswer(409, INCONSISTENT_WITH_STATE).warning_header("broker:8080") == {
        "Warning": f"299 broker:8080: {INCONSISTENT_WITH_STATE}"}
    echoed = HttpAnswer(400, "Procedure Step State 'GEPL\u00c4NT\r\nX: y' is not valid")
    assert echoed.warning_header("h") == {"Warning": "299 h: Procedure Step State 'GEPL?NT??X: y' is not valid"}
