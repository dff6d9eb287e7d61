"""Moving a procedure through its states, recording each transition, and queuing the RIS status.

Every method works inside the caller's transaction. The state is changed by a conditional UPDATE
(``WHERE state = <the state read>``) so two events for the same procedure on two connections cannot
both move it from the same state; the loser reads the new state and decides again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, bindparam, insert, select, update

from broker.config import RIS_ORDER_STATUS
from broker.domain.procedure_states import FROM_STEP_STATUS, ProcedureState, is_allowed
from broker.domain.records import Cause
from broker.outbox import outbox
from broker.store.tables import ORDERS, PATIENTS, PROCEDURE_TRANSITIONS, PROCEDURES, STEPS

log = structlog.get_logger(__name__)


_STATE = select(PROCEDURES.c.state).where(PROCEDURES.c.id == bindparam("pk"))
_MOVE = (update(PROCEDURES).where(PROCEDURES.c.id == bindparam("pk"), PROCEDURES.c.state == bindparam("from_state"))
         .values(state=bindparam("to_state"), updated_at=bindparam("now")))
_INSERT_TRANSITION = insert(PROCEDURE_TRANSITIONS)
# What an HL7 status message says of the procedure, its order and patient, and its first step.
_RIS_STATUS_FACTS = (
    select(PROCEDURES.c.id, PROCEDURES.c.order_fk, PROCEDURES.c.accession_number, PROCEDURES.c.requested_procedure_id,
           PROCEDURES.c.study_instance_uid, PROCEDURES.c.description, ORDERS.c.sender, ORDERS.c.placer_order_number,
           ORDERS.c.placer_issuer, ORDERS.c.filler_order_number, ORDERS.c.filler_issuer, PATIENTS.c.patient_id,
           PATIENTS.c.issuer, PATIENTS.c.patient_name)
    .join(ORDERS, ORDERS.c.id == PROCEDURES.c.order_fk).join(PATIENTS, PATIENTS.c.id == ORDERS.c.patient_fk)
    .where(PROCEDURES.c.id == bindparam("pk")))
_FIRST_STEP = (select(STEPS.c.sps_id, STEPS.c.modality).where(STEPS.c.procedure_fk == bindparam("pk"))
               .order_by(STEPS.c.id).limit(1))
# States after the outcome of the acquisition (COMPLETED / DISCONTINUED) has been passed.
_PAST_OUTCOME = {ProcedureState.IMAGES_AVAILABLE, ProcedureState.ARCHIVED, ProcedureState.COMMIT_FAILED}


class ProcedureTracker:
    """Applies the state machine of :mod:`broker.domain.procedure_states` to stored procedures.

    ``ris_transitions``: states whose reaching is reported to the RIS as an outbox row ``ris.status``
    (empty = nothing is reported). Changes caused by HL7 are never reported back: the RIS sent them.
    """

    def __init__(self, ris_transitions: frozenset[str] = frozenset(),
                 clock: Callable[[], datetime] = datetime.now) -> None:
        self.ris_transitions = ris_transitions
        self.clock = clock

    def follow_step(self, db: Connection, procedure_pk: int, step_status: str, cause: Cause) -> bool:
        """A step of the procedure got ``step_status``: move the procedure accordingly (if that is a move)."""
        target = FROM_STEP_STATUS.get(str(step_status))
        return target is not None and self.advance(db, procedure_pk, target, cause)

    def advance(self, db: Connection, procedure_pk: int, target: ProcedureState, cause: Cause) -> bool:
        """Move the procedure to ``target`` if the state machine allows it; returns whether it moved.

        A move backward is logged and ignored. Reaching COMPLETED / DISCONTINUED after an IAN already
        moved the procedure past it still tells the RIS the outcome (the RIS must not wait forever).
        """
        for _ in range(5):
            current = db.execute(_STATE, {"pk": procedure_pk}).scalar_one_or_none()
            if current is None:
                return False
            if current == target:
                return False
            if not is_allowed(current, target):
                log.info("procedure.transition_ignored", procedure_pk=procedure_pk, state=current,
                         target=str(target), cause=cause.text)
                if current in _PAST_OUTCOME and target in (ProcedureState.COMPLETED, ProcedureState.DISCONTINUED):
                    self._notify_ris(db, procedure_pk, target, cause, self.clock())
                return False
            now = self.clock()
            moved = db.execute(_MOVE, {"pk": procedure_pk, "from_state": current, "to_state": str(target),
                                       "now": now}).rowcount
            if moved:
                db.execute(_INSERT_TRANSITION, {
                    "procedure_fk": procedure_pk, "at": now, "from_state": current, "to_state": str(target),
                    "cause": cause.text[:200], "event_kind": cause.event_kind, "event_ref": cause.event_ref[:64],
                    "inbound_message_fk": cause.inbound_message_id})
                log.info("procedure.transition", procedure_pk=procedure_pk, from_state=current,
                         to_state=str(target), cause=cause.text)
                self._notify_ris(db, procedure_pk, target, cause, now)
                return True
        log.warning("procedure.transition_contended", procedure_pk=procedure_pk, target=str(target))
        return False

    def _notify_ris(self, db: Connection, procedure_pk: int, target: ProcedureState, cause: Cause,
                    now: datetime) -> None:
        if str(target) not in self.ris_transitions or cause.event_kind == "hl7":
            return
        payload = ris_status_payload(db, procedure_pk, target, cause, now)
        outbox.add_event(db, outbox.RIS_STATUS, payload, f"order:{payload['order_pk']}", now)


def ris_status_payload(db: Connection, procedure_pk: int, target: ProcedureState, cause: Cause,
                       now: datetime) -> dict[str, Any]:
    """What the HL7 status message needs, read now: the message is built from the state at this event."""
    row = db.execute(_RIS_STATUS_FACTS, {"pk": procedure_pk}).one()
    step = db.execute(_FIRST_STEP, {"pk": procedure_pk}).first()
    return {
        "procedure_pk": procedure_pk, "order_pk": row.order_fk, "state": str(target),
        "order_status": RIS_ORDER_STATUS[str(target)], "at": now.strftime("%Y%m%d%H%M%S"), "cause": cause.text,
        "sender": row.sender, "placer_order_number": row.placer_order_number, "placer_issuer": row.placer_issuer,
        "filler_order_number": row.filler_order_number, "filler_issuer": row.filler_issuer,
        "accession_number": row.accession_number, "requested_procedure_id": row.requested_procedure_id,
        "study_instance_uid": row.study_instance_uid, "description": row.description,
        "patient_id": row.patient_id, "issuer_of_patient_id": row.issuer, "patient_name": row.patient_name,
        "sps_id": step.sps_id if step else "", "modality": step.modality if step else "",
    }
