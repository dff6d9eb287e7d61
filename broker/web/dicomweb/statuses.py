"""The HTTP answer of a UPS-RS transaction (PS3.18 chapter 11) for the DIMSE outcome of the UPS service.

The rules live in :class:`broker.ups.service.UpsService`, which answers with the DIMSE statuses of
PS3.4 CC.2 (the same the DIMSE UPS SCP sends). UPS-RS turns each into the HTTP status its transaction's
table lists (PS3.18 Tables 11.4.3-1 Create, 11.5.3-1 Retrieve, 11.6.3-1 Update, 11.7.3-1 Change State,
11.8.3-1 Request Cancellation) and a ``Warning: 299 <service>: <text>`` header with the standard's
words (Tables 11.x.3-2), so that a refusal says why and a client written against the standard
recognises it. Where the standard has no words for a case, the DIMSE Error Comment is the text.

The correspondence, DIMSE status -> HTTP status, per transaction:

========================================  ======  ======  ======  ============  ============
DIMSE status                              Create  Update  State   Cancellation  Retrieve
========================================  ======  ======  ======  ============  ============
0000 success                              201     200     200     202           200
B304 already CANCELED (warning)           -       -       200     202           -
B306 already COMPLETED (warning)          -       -       200     -             -
0111 duplicate SOP instance               409     -       -       -             -
0105 / 0106 / 0115 / 0120 / 0121          400     400     400     400           400
C300 may no longer be updated             -       400     409     -             -
C301 wrong / missing Transaction UID      -       400     400     -             -
C302 already IN PROGRESS                  -       -       409     -             -
C303 may only become SCHEDULED by create  -       400     400     -             -
C304 final state requirements not met     -       -       409     -             -
C307 no such workitem                     -       404     404     404           404
C309 created not SCHEDULED                400     -       -       -             -
C310 not yet IN PROGRESS                  -       -       409     -             -
C311 already COMPLETED (cancel)           -       -       -       409           -
0110 database unavailable                 503     503     503     503           503
0110 other processing failure             500     500     500     500           500
========================================  ======  ======  ======  ============  ============

PS3.18 puts the Transaction UID cases of Update and Change State under 400 (Bad Request: "the
Transaction UID is missing / incorrect") and what contradicts the workitem's state under 409
(Conflict); an Update of a final workitem is 400 in Table 11.6.3-1, a Change State of one 409.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from broker.domain.ups_states import (
    ALREADY_CANCELED,
    ALREADY_COMPLETED,
    ALREADY_IN_PROGRESS,
    CANNOT_CANCEL_COMPLETED,
    COMMENTS,
    CREATE_NOT_SCHEDULED,
    FINAL_STATE_NOT_MET,
    MAY_NO_LONGER_BE_UPDATED,
    NO_SUCH_UPS,
    NOT_IN_PROGRESS,
    ONLY_SCHEDULED_BY_N_CREATE,
    WRONG_TRANSACTION_UID,
)
from broker.workflow.outcome import (
    DUPLICATE_SOP_INSTANCE,
    MISSING_ATTRIBUTE,
    PROCESSING_FAILURE,
    SUCCESS,
    Outcome,
)


class Transaction(StrEnum):
    """The UPS-RS transactions of this module (search and subscriptions answer elsewhere)."""

    CREATE = "create"
    RETRIEVE = "retrieve"
    UPDATE = "update"
    CHANGE_STATE = "change state"
    REQUEST_CANCELLATION = "request cancellation"


SUCCESS_CODES = {Transaction.CREATE: 201, Transaction.RETRIEVE: 200, Transaction.UPDATE: 200,
                 Transaction.CHANGE_STATE: 200, Transaction.REQUEST_CANCELLATION: 202}

# The standard's Warning texts (PS3.18 Tables 11.6.3-2, 11.7.3-2, 11.8.3-2).
ALREADY_CANCELED_TEXT = "The UPS is already in the requested state of CANCELED."
ALREADY_COMPLETED_TEXT = "The UPS is already in the requested state of COMPLETED."
TRANSACTION_UID_MISSING = "The Transaction UID is missing."
TRANSACTION_UID_INCORRECT = "The Transaction UID is incorrect."
INCONSISTENT_WITH_STATE = "The submitted request is inconsistent with the state of the UPS Instance."
UPDATE_INCONSISTENT = "The submitted request is inconsistent with the current state of the Workitem."
UPDATE_NOT_CLAIMED = "The target URI did not reference a claimed Workitem."
CANCEL_COMPLETED = "The UPS is already COMPLETED."
NOT_FOUND = "The Target Workitem was not found."
ALREADY_EXISTS = "The Target Workitem already exists."
DATABASE_UNAVAILABLE = "database unavailable"  # the start of the service's 0110 Error Comment for it

# Failures whose HTTP status depends on the transaction (the rest: see _GENERAL).
_BY_TRANSACTION: dict[tuple[Transaction, int], tuple[int, str]] = {
    (Transaction.UPDATE, MAY_NO_LONGER_BE_UPDATED): (400, UPDATE_INCONSISTENT),
    (Transaction.CHANGE_STATE, MAY_NO_LONGER_BE_UPDATED): (409, INCONSISTENT_WITH_STATE),
    (Transaction.CHANGE_STATE, ALREADY_IN_PROGRESS): (409, INCONSISTENT_WITH_STATE),
    (Transaction.CHANGE_STATE, NOT_IN_PROGRESS): (409, INCONSISTENT_WITH_STATE),
    (Transaction.CHANGE_STATE, FINAL_STATE_NOT_MET): (409, INCONSISTENT_WITH_STATE),
    (Transaction.REQUEST_CANCELLATION, CANNOT_CANCEL_COMPLETED): (409, CANCEL_COMPLETED),
    (Transaction.CREATE, DUPLICATE_SOP_INSTANCE): (409, ALREADY_EXISTS),
}
# Failures that mean the same in every transaction: the request itself is wrong (400) or names no
# workitem (404).
_GENERAL: dict[int, int] = {NO_SUCH_UPS: 404, ONLY_SCHEDULED_BY_N_CREATE: 400, CREATE_NOT_SCHEDULED: 400,
                            0x0105: 400, 0x0106: 400, 0x0115: 400, MISSING_ATTRIBUTE: 400, 0x0121: 400,
                            0x0123: 400}


@dataclass(frozen=True)
class HttpAnswer:
    """What the route answers: the HTTP status, the Warning text (empty: no Warning header) and, for a
    failure, the specific reason (the DIMSE Error Comment) for the response body."""

    status_code: int
    warning: str = ""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status_code < 300

    def warning_header(self, service: str) -> dict[str, str]:
        """The ``Warning`` header field (RFC 7234 warn-code 299, PS3.18 8.4's form), or none. ``service``
        names the origin server (its host and port as the client addressed it). The header is kept to
        printable ASCII: a value echoed from the request may hold anything."""
        if not self.warning:
            return {}
        text = "".join(c if " " <= c <= "~" else "?" for c in self.warning)
        return {"Warning": f"299 {service}: {text}"}


def answer(transaction: Transaction, outcome: Outcome, *, transaction_uid_given: bool = False) -> HttpAnswer:
    """The HTTP answer of ``transaction`` for the service's ``outcome``.

    ``transaction_uid_given``: whether the request carried a Transaction UID, which tells "missing" from
    "incorrect" when the service answers C301 (the DIMSE status is the same for both)."""
    status, comment = outcome.status, outcome.error_comment or ""
    if status == SUCCESS:
        return HttpAnswer(SUCCESS_CODES[transaction])
    if status == ALREADY_CANCELED and transaction in (Transaction.CHANGE_STATE, Transaction.REQUEST_CANCELLATION):
        return HttpAnswer(SUCCESS_CODES[transaction], ALREADY_CANCELED_TEXT)
    if status == ALREADY_COMPLETED and transaction == Transaction.CHANGE_STATE:
        return HttpAnswer(SUCCESS_CODES[transaction], ALREADY_COMPLETED_TEXT)
    detail = comment or COMMENTS.get(status, f"DIMSE status {status:04X}")
    if status == WRONG_TRANSACTION_UID:
        if not transaction_uid_given:
            return HttpAnswer(400, TRANSACTION_UID_MISSING, detail)
        return HttpAnswer(400, UPDATE_NOT_CLAIMED if transaction == Transaction.UPDATE else TRANSACTION_UID_INCORRECT,
                          detail)
    if (transaction, status) in _BY_TRANSACTION:
        # the standard's words in the Warning header (clients may look for them), the particular
        # reason (e.g. which attribute a completion lacks) in the body
        code, text = _BY_TRANSACTION[(transaction, status)]
        return HttpAnswer(code, text, detail)
    if status == NO_SUCH_UPS:
        return HttpAnswer(404, NOT_FOUND, detail)
    if status == MISSING_ATTRIBUTE and "Transaction UID" in comment:
        return HttpAnswer(400, TRANSACTION_UID_MISSING, detail)  # a claim without one
    if status in _GENERAL:
        return HttpAnswer(_GENERAL[status], detail, detail)
    if status == PROCESSING_FAILURE:
        return HttpAnswer(503 if comment.startswith(DATABASE_UNAVAILABLE) else 500, detail, detail)
    if 0xB000 <= status <= 0xBFFF:  # another warning: done, with the warning said
        return HttpAnswer(SUCCESS_CODES[transaction], detail)
    # A failure this table does not know: the request conflicts with something (0xCxxx are the
    # UPS-specific conflicts), else the server failed.
    return HttpAnswer(409 if 0xC000 <= status <= 0xCFFF else 500, detail, detail)
