"""Which domain command an HL7 message is, and the call that applies it (spec section 1).

The ORC-1 / ORC-5 table of the spec lives in :data:`ORDER_CONTROL`; message types in
:data:`HANDLERS`. Domain refusals (unknown order, duplicate key, circular merge) become HL7 problems
with the segment and field that named the key.

A handler works in two steps: reading the message (mapping and checking it, no database) gives an
:data:`Apply`, which then makes the changes through the domain service inside the intake's
transaction. The intake reads a message in its connection's own thread before it takes the
database, so that mapping one message overlaps with another one's statements and commit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from broker.domain.records import Cause, OrderRecord, PatientKey
from broker.domain.services import DomainError, WorklistService
from broker.domain.states import StepStatus
from broker.hl7.errors import (
    APPLICATION_INTERNAL_ERROR,
    DUPLICATE_KEY,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    TABLE_VALUE_NOT_FOUND,
    UNKNOWN_KEY,
    UNSUPPORTED_MESSAGE_TYPE,
    MessageError,
    Problem,
)
from broker.hl7.message import Message
from broker.mapping.charsets import Charset
from broker.mapping.engine import Mapper
from broker.mapping.rules import Mapping


@dataclass
class Context:
    """Everything a handler needs to read one message."""

    message: Message
    mapping: Mapping
    charset: Charset
    uid_root: str

    @property
    def sender(self) -> str:
        return "^".join(self.message.sender)


Apply = Callable[[WorklistService, Cause], str]
"""A message's domain command: makes its changes and returns the ACK's text (MSA-3). It may run
again after a rolled-back attempt, so it changes nothing but the database."""


# (ORC-1, ORC-5) -> action; "*" = any ORC-5. "place"/"replace" carry the steps; a status applies to
# the order's steps; None = status only, nothing changes.
ORDER_CONTROL: dict[tuple[str, str], str | StepStatus | None] = {
    ("NW", "*"): "place",
    ("XO", "CM"): StepStatus.COMPLETED,
    ("XO", "*"): "replace",
    ("SC", "CM"): StepStatus.COMPLETED,
    ("SC", "IP"): StepStatus.STARTED,
    ("SC", "*"): None,
    ("CA", "*"): StepStatus.CANCELED,
    ("OC", "*"): StepStatus.CANCELED,
    ("DC", "*"): StepStatus.DISCONTINUED,
    ("OD", "*"): StepStatus.DISCONTINUED,
}


def order_action(control: str, status: str) -> str | StepStatus | None:
    """The action for ORC-1/ORC-5; raises KeyError for an order control the broker does not take."""
    if (control, status) in ORDER_CONTROL:
        return ORDER_CONTROL[(control, status)]
    return ORDER_CONTROL[(control, "*")]


def handle_order(ctx: Context) -> Apply:
    """ORM^O01, OMI^O23, OMG^O19: apply each ORC group's order control."""
    mapper = Mapper(ctx.message, ctx.mapping, ctx.charset, ctx.uid_root)
    orcs = ctx.message.all("ORC")
    if not orcs:
        raise MessageError([Problem(SEGMENT_SEQUENCE_ERROR, "an order message needs an ORC segment", "ORC")])
    patient = mapper.map_patient()
    orders = mapper.map_orders()
    problems: list[Problem] = []
    actions: list[tuple[OrderRecord, str | StepStatus | None, int]] = []
    for index, order in enumerate(orders, start=1):
        if not order.order_control:
            problems.append(Problem(REQUIRED_FIELD_MISSING, "ORC-1 order control is required", "ORC", index, 1))
            continue
        try:
            action = order_action(order.order_control, order.order_status)
        except KeyError:
            problems.append(Problem(TABLE_VALUE_NOT_FOUND,
                                    f"order control {order.order_control!r} is not supported", "ORC", index, 1))
            continue
        if not (order.placer_order_number or order.filler_order_number):
            problems.append(Problem(REQUIRED_FIELD_MISSING, "ORC-2 or ORC-3 order number is required",
                                    "ORC", index, 2))
            continue
        actions.append((order, action, index))
    if any(a in ("place", "replace") for _, a, _ in actions):
        # Only new and changed orders need their full content; a cancel needs just the order number.
        try:
            mapper.raise_problems()
        except MessageError as exc:
            problems.extend(exc.problems)
        if patient is None and not any(p.segment == "PID" for p in problems):
            problems.append(Problem(REQUIRED_FIELD_MISSING, "PID-3 patient identifier is required",
                                    "PID", 1, 3))
    if problems:
        raise MessageError(problems)
    sender = ctx.sender

    def apply(service: WorklistService, cause: Cause) -> str:
        done: list[str] = []
        for order, action, index in actions:
            try:
                if action == "place":
                    assert patient is not None
                    created = service.place_order(patient, order, sender, cause)
                    done.append(f"{created} step(s) scheduled")
                elif action == "replace":
                    assert patient is not None
                    count = service.replace_order(patient, order, cause)
                    done.append(f"{count} step(s) updated")
                elif isinstance(action, StepStatus):
                    count = service.change_order_status(order, action, cause)
                    done.append(f"{count} step(s) {action}")
                else:
                    done.append("status noted")
            except DomainError as exc:
                raise MessageError([_domain_problem(exc, index)]) from exc
        return "; ".join(done)

    return apply


def _domain_problem(exc: DomainError, orc_index: int) -> Problem:
    code = {"unknown_order": UNKNOWN_KEY, "duplicate_order": DUPLICATE_KEY,
            "duplicate_step": DUPLICATE_KEY}.get(exc.kind, APPLICATION_INTERNAL_ERROR)
    if exc.subject == "step":
        return Problem(code, exc.text, "OBR", orc_index, 20)
    if exc.subject == "prior_patient":
        return Problem(code, exc.text, "MRG", 1, 1)
    return Problem(code, exc.text, "ORC", orc_index, 2)


def _patient_or_error(ctx: Context) -> tuple[Mapper, PatientKey]:
    mapper = Mapper(ctx.message, ctx.mapping, ctx.charset, ctx.uid_root)
    key = mapper.patient_key()
    if key is None:
        raise MessageError([Problem(REQUIRED_FIELD_MISSING, "PID-3 patient identifier is required",
                                    "PID", 1, 3)])
    return mapper, key


def handle_patient_update(ctx: Context) -> Apply:
    """ADT A01/A04/A05/A08/A31: create or update the patient, propagate to open items."""
    mapper, _ = _patient_or_error(ctx)
    patient = mapper.map_patient()
    mapper.raise_problems()
    assert patient is not None

    def apply(service: WorklistService, cause: Cause) -> str:
        count = service.update_patient(patient, cause)
        return f"patient updated, {count} open item(s) refreshed"

    return apply


def handle_merge(ctx: Context) -> Apply:
    """ADT A40 (merge) and A47 (identifier change): MRG-1 is the prior identifier."""
    mapper, _ = _patient_or_error(ctx)
    patient = mapper.map_patient()
    prior = mapper.patient_key("MRG", 1)
    if prior is None:
        mapper.problems.append(Problem(REQUIRED_FIELD_MISSING, "MRG-1 prior patient identifier is required",
                                       "MRG", 1, 1))
    mapper.raise_problems()
    assert patient is not None and prior is not None
    change_identifier = ctx.message.message_type[1] == "A47"

    def apply(service: WorklistService, cause: Cause) -> str:
        try:
            count = service.merge_patient(patient, prior, cause, change_identifier=change_identifier)
        except DomainError as exc:
            raise MessageError([_domain_problem(exc, 1)]) from exc
        return f"{count} item(s) moved to the surviving patient"

    return apply


def handle_arrival(ctx: Context) -> Apply:
    """ADT A10: today's (the event's day) SCHEDULED steps of the patient become ARRIVED."""
    _, key = _patient_or_error(ctx)
    evn = ctx.message.first("EVN")
    when = (ctx.message.value(evn, 6) or ctx.message.value(evn, 2) or ctx.message.value(ctx.message.msh, 7))
    pv1 = ctx.message.first("PV1")
    admission = ctx.message.value(pv1, 19) or ctx.message.value(ctx.message.first("PID"), 18)
    day = when[:8]

    def apply(service: WorklistService, cause: Cause) -> str:
        count = service.patient_arrived(key, day, admission, cause)
        return f"{count} step(s) arrived"

    return apply


HANDLERS: dict[tuple[str, str], Callable[[Context], Apply]] = {
    ("ORM", "O01"): handle_order,
    ("OMI", "O23"): handle_order,
    ("OMG", "O19"): handle_order,
    ("ADT", "A01"): handle_patient_update,
    ("ADT", "A04"): handle_patient_update,
    ("ADT", "A05"): handle_patient_update,
    ("ADT", "A08"): handle_patient_update,
    ("ADT", "A31"): handle_patient_update,
    ("ADT", "A40"): handle_merge,
    ("ADT", "A47"): handle_merge,
    ("ADT", "A10"): handle_arrival,
}


def handler_for(message: Message) -> Callable[[Context], Apply]:
    """The handler of a message type; unsupported types are refused with ERR 200 (AR)."""
    kind = message.message_type
    handler = HANDLERS.get(kind)
    if handler is None:
        raise MessageError([Problem(UNSUPPORTED_MESSAGE_TYPE, f"message type {'^'.join(kind)} is not supported",
                                    "MSH", 1, 9)], reject=True)
    return handler
