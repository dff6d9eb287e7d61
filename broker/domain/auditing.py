"""The audit records of changes to patient and procedure data, written in the transaction of the change.

A change the broker commits (an order placed, changed or cancelled; a patient updated or merged; a
step or procedure moved by MPPS, UPS, IAN or Storage Commitment) adds its DICOM audit message
(PS3.15 A.5.3: Order Record, Patient Record, Procedure Record) to the same transaction with
:func:`broker.audit.trail.record`. A change that rolls back (an HL7 message answered AE/AR, a DIMSE
request refused) leaves no record; a change that commits always has one.

One record per event that changes something (an ORC of an HL7 order, an ADT message, an N-CREATE, an
N-SET, an N-ACTION, a commitment result), not per row it touches: the record says who asked for which
change to which patient's data; the procedure's timeline says which rows moved.

:class:`ChangeAudit` is the requestor of one call (its :class:`~broker.audit.events.Source`) and the
broker as the other participant. A service gets one per call, or None when ``audit_enabled`` is off.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select

from broker.audit import events
from broker.audit.events import Action, Participant, ParticipantObject, Source
from broker.audit.trail import record
from broker.domain.records import OrderRecord, PatientKey
from broker.store.tables import Order, Patient, RequestedProcedure, table_of

PROCEDURES = table_of(RequestedProcedure)
ORDERS = table_of(Order)
PATIENTS = table_of(Patient)

# Who a procedure belongs to and what names it, for the Procedure Record of a procedure-level event
# (IAN, Storage Commitment), which knows only the procedure's key.
_PROCEDURE_SUBJECT = (
    select(PATIENTS.c.patient_id, PATIENTS.c.issuer, PROCEDURES.c.accession_number, PROCEDURES.c.study_instance_uid)
    .join(ORDERS, ORDERS.c.id == PROCEDURES.c.order_fk).join(PATIENTS, PATIENTS.c.id == ORDERS.c.patient_fk)
    .where(PROCEDURES.c.id == bindparam("pk")))


@dataclass(frozen=True)
class ProcedureSubject:
    """What a Procedure Record names: the patient, the study, the order (accession) and the step."""

    patient: PatientKey
    study_uid: str = ""
    accession_number: str = ""
    step_id: str = ""
    """The SPS ID of a scheduled step, or the SOP Instance UID of a UPS workitem."""


def step_subject(step: Any, step_id: str = "") -> ProcedureSubject:
    """The subject of a stored step row (``scheduled_steps``); ``step_id`` defaults to its SPS ID."""
    return ProcedureSubject(PatientKey(step.patient_id, step.issuer_of_patient_id), step.study_instance_uid,
                            step.accession_number, step_id or step.sps_id)


def procedure_subject(db: Connection, procedure_pk: int) -> ProcedureSubject | None:
    """The subject of a stored requested procedure (its order's patient), or None if it is gone."""
    row = db.execute(_PROCEDURE_SUBJECT, {"pk": procedure_pk}).first()
    if row is None:
        return None
    return ProcedureSubject(PatientKey(row.patient_id, row.issuer), row.study_instance_uid, row.accession_number)


@dataclass(frozen=True)
class ChangeAudit:
    """Records the audit events of one requestor's changes in the caller's transaction."""

    source: Source
    broker: Participant

    def order(self, db: Connection, action: Action, patient: PatientKey, order: OrderRecord,
              now: datetime, steps: Iterable[Any] = ()) -> None:
        """Order Record: an order created (C), changed (U) or cancelled / discontinued (D). The order is
        named by the accession numbers and studies of its stored ``steps`` when given (a status change:
        a cancel message need not name them, and what the mapping makes of its absence, a generated
        Study Instance UID, is not the order's), else by those of ``order``'s procedures."""
        names = [(s.accession_number, s.study_instance_uid) for s in steps] or \
            [(p.accession_number, p.study_instance_uid) for p in order.procedures]
        names = list(dict.fromkeys(names))
        first_accession, first_study = names[0] if names else ("", "")
        event = events.order_record(action, self.source, self.broker, patient_id=str(patient),
                                    accession_number=first_accession, study_uid=first_study)
        more = [obj for accession, study in names[1:] for obj in (
            ParticipantObject("order", accession) if accession else None,
            ParticipantObject("study", study) if study else None) if obj is not None]
        if more:
            event = replace(event, objects=event.objects + tuple(more))
        record(db, event, now)

    def patient(self, db: Connection, action: Action, patient: PatientKey, now: datetime,
                merged: PatientKey | None = None) -> None:
        """Patient Record: demographics created (C) or updated (U); a merge or an identifier change names
        the retired identifier (``merged``) beside the surviving one."""
        record(db, events.patient_record(action, self.source, self.broker, patient_id=str(patient),
                                         merged_patient_id=str(merged) if merged else ""), now)

    def procedure(self, db: Connection, action: Action, subject: ProcedureSubject, description: str,
                  now: datetime) -> None:
        """Procedure Record: a step or procedure created (C) or changed (U); ``description`` says what
        changed ("MPPS COMPLETED", "UPS CANCELED", "Storage Commitment failed")."""
        record(db, events.procedure_record(action, self.source, self.broker, patient_id=str(subject.patient),
                                           study_uid=subject.study_uid, accession_number=subject.accession_number,
                                           step_id=subject.step_id, description=description), now)

    def restricted_use(self, db: Connection, reason: str, resource: str, now: datetime) -> None:
        """Security Alert, Use of Restricted Function: a replayed message (see broker.intake.service)."""
        record(db, events.security_alert(self.source, self.broker, alert=events.USE_OF_RESTRICTED_FUNCTION,
                                         reason=reason, resource=resource), now)

