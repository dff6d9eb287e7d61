"""Domain services: each applies one command inside the caller's transaction.

The caller (HL7 intake today, the REST API later) opens the transaction, calls one of these, and
commits; the answer to the sender is built only after that commit. Nothing here knows HL7 or DICOM
networking: input is records (DICOM JSON), output is stored rows, failures are :class:`DomainError`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from broker.dicom_json import JsonDataset, element, tag_of, value
from broker.domain import worklist_item
from broker.domain.records import OrderRecord, PatientKey, PatientRecord, ProcedureRecord
from broker.domain.states import FINAL, NOT_STARTED, OPEN, StepStatus
from broker.store.tables import Order, Patient, RequestedProcedure, ScheduledStep, StepTransition

log = structlog.get_logger(__name__)


class DomainError(Exception):
    """A command cannot be applied; ``kind`` says why (unknown_order, duplicate_order, ...)."""

    def __init__(self, kind: str, text: str, subject: str = "") -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text
        self.subject = subject  # which part of the command: "order", "step", "patient", "prior_patient"


@dataclass(frozen=True)
class Cause:
    """Why a change happened: shown in a procedure's timeline."""

    text: str
    inbound_message_id: int | None = None


class WorklistService:
    """Patients, orders and scheduled steps: the commands of spec section 1."""

    def __init__(self, session: Session, clock: Callable[[], datetime] = datetime.now) -> None:
        self.session = session
        self.clock = clock

    # --- patients ----------------------------------------------------------------------------------
    def _find_patient(self, key: PatientKey) -> Patient | None:
        return self.session.scalars(
            select(Patient).where(Patient.patient_id == key.patient_id, Patient.issuer == key.issuer)
        ).one_or_none()

    def _surviving(self, patient: Patient) -> Patient:
        seen = {patient.id}
        while patient.merged_into_id is not None:
            patient = self.session.get_one(Patient, patient.merged_into_id)
            if patient.id in seen:  # pragma: no cover - merges are checked for cycles when made
                break
            seen.add(patient.id)
        return patient

    def upsert_patient(self, record: PatientRecord) -> Patient:
        """Create the patient or update the attributes the record carries; follows earlier merges."""
        now = self.clock()
        patient = self._find_patient(record.key)
        if patient is None:
            patient = Patient(patient_id=record.key.patient_id, issuer=record.key.issuer, attributes={},
                              created_at=now, updated_at=now)
            self.session.add(patient)
        elif patient.merged_into_id is not None:
            surviving = self._surviving(patient)
            log.info("patient.redirected_to_surviving", patient_pk=patient.id, surviving_pk=surviving.id)
            patient = surviving
            record = PatientRecord(PatientKey(patient.patient_id, patient.issuer),
                                   {k: v for k, v in record.attributes.items() if k not in _IDENTITY_TAGS})
        attributes = dict(patient.attributes or {})
        attributes.update(copy.deepcopy(record.attributes))
        attributes.update(_identity_attributes(PatientKey(patient.patient_id, patient.issuer)))
        patient.attributes = attributes
        patient.patient_name = value(attributes, "PatientName")
        patient.birth_date = value(attributes, "PatientBirthDate")
        patient.sex = value(attributes, "PatientSex")
        patient.updated_at = now
        self.session.flush()
        return patient

    def update_patient(self, record: PatientRecord, cause: Cause) -> int:
        """ADT A01/A04/A05/A08/A31: update the patient; propagate to its open items. Returns their count."""
        patient = self.upsert_patient(record)
        return self._refresh_items(patient, self._steps_of(patient, OPEN))

    def merge_patient(self, surviving: PatientRecord, prior: PatientKey, cause: Cause,
                      *, change_identifier: bool = False) -> int:
        """ADT A40 (merge) / A47 (identifier change): move the prior patient's items to the surviving one.

        Returns the number of items moved. A merge of a patient into itself, or into a patient that was
        itself merged into the prior one, is refused as circular.
        """
        if surviving.key == prior:
            raise DomainError("circular_merge", f"patient {prior} cannot be merged into itself",
                              "prior_patient")
        prior_patient = self._find_patient(prior)
        if change_identifier and prior_patient is not None and self._find_patient(surviving.key) is None:
            # A47 to an unused identifier: the same patient gets a new ID.
            prior_patient.patient_id, prior_patient.issuer = surviving.key.patient_id, surviving.key.issuer
            self.session.flush()
            patient = self.upsert_patient(surviving)
            return self._refresh_items(patient, self._steps_of(patient, None))
        target = self.upsert_patient(surviving)
        if prior_patient is None:
            now = self.clock()
            prior_patient = Patient(patient_id=prior.patient_id, issuer=prior.issuer,
                                    attributes=_identity_attributes(prior), created_at=now, updated_at=now)
            self.session.add(prior_patient)
            self.session.flush()
        if self._surviving(target).id == prior_patient.id or prior_patient.id == target.id:
            raise DomainError("circular_merge", f"patient {surviving.key} was merged into {prior}; "
                              "merging back would be circular", "prior_patient")
        if prior_patient.merged_into_id is not None and self._surviving(prior_patient).id != target.id:
            raise DomainError("already_merged", f"patient {prior} was already merged into another patient",
                              "prior_patient")
        steps = self._steps_of(prior_patient, None)
        for order in self.session.scalars(select(Order).where(Order.patient_fk == prior_patient.id)):
            order.patient_fk = target.id
        for step in steps:
            step.patient_fk = target.id
        prior_patient.merged_into_id = target.id
        prior_patient.updated_at = self.clock()
        moved = self._refresh_items(target, steps)
        log.info("patient.merged", prior_pk=prior_patient.id, surviving_pk=target.id, items=moved)
        return moved

    def patient_arrived(self, key: PatientKey, day: str, admission_id: str, cause: Cause) -> int:
        """ADT A10: the patient's SCHEDULED steps of ``day`` (YYYYMMDD) become ARRIVED."""
        patient = self._find_patient(key)
        if patient is None:
            return 0
        patient = self._surviving(patient)
        steps = [s for s in self._steps_of(patient, {StepStatus.SCHEDULED}) if s.sps_start_date == day]
        if admission_id and any(s.admission_id == admission_id for s in steps):
            steps = [s for s in steps if s.admission_id == admission_id]
        for step in steps:
            self._set_status(step, StepStatus.ARRIVED, cause)
        return len(steps)

    def _steps_of(self, patient: Patient, statuses: Iterable[str] | None) -> list[ScheduledStep]:
        query = select(ScheduledStep).where(ScheduledStep.patient_fk == patient.id)
        if statuses is not None:
            query = query.where(ScheduledStep.sps_status.in_([str(s) for s in statuses]))
        return list(self.session.scalars(query.order_by(ScheduledStep.id)))

    def _refresh_items(self, patient: Patient, steps: list[ScheduledStep]) -> int:
        now = self.clock()
        for step in steps:
            item = copy.deepcopy(step.item)
            worklist_item.apply_patient_attributes(item, patient.attributes)
            _store_item(step, item, now)
        return len(steps)

    # --- orders ------------------------------------------------------------------------------------
    def find_order(self, record: OrderRecord) -> Order | None:
        """The stored order with the record's placer order number, else its filler order number."""
        conditions = []
        if record.placer_order_number:
            conditions.append((Order.placer_order_number == record.placer_order_number)
                              & (Order.placer_issuer == record.placer_issuer))
        if record.filler_order_number:
            conditions.append((Order.filler_order_number == record.filler_order_number)
                              & (Order.filler_issuer == record.filler_issuer))
        if not conditions:
            return None
        return self.session.scalars(select(Order).where(or_(*conditions)).order_by(Order.id)).first()

    def place_order(self, patient_record: PatientRecord, record: OrderRecord, sender: str,
                    cause: Cause) -> list[ScheduledStep]:
        """ORC-1 NW: a new order with its requested procedures and steps, all SCHEDULED."""
        if self.find_order(record) is not None:
            raise DomainError("duplicate_order", f"order {record.placer_order_number or record.filler_order_number}"
                              " exists already", "order")
        patient = self.upsert_patient(patient_record)
        now = self.clock()
        order = Order(patient_fk=patient.id, sender=sender, placer_order_number=record.placer_order_number,
                      placer_issuer=record.placer_issuer, filler_order_number=record.filler_order_number,
                      filler_issuer=record.filler_issuer, order_control=record.order_control,
                      order_status=record.order_status, created_at=now, updated_at=now)
        self.session.add(order)
        self.session.flush()
        created: list[ScheduledStep] = []
        for procedure_record in record.procedures:
            procedure = self._add_procedure(order, procedure_record, now)
            for step_record in procedure_record.steps:
                self._check_step_is_new(procedure_record.study_instance_uid, step_record.sps_id)
                created.append(self._add_step(procedure, patient, step_record.item, cause, now))
        return created

    def replace_order(self, patient_record: PatientRecord, record: OrderRecord, cause: Cause) -> int:
        """ORC-1 XO: update the steps keyed by Study Instance UID + SPS ID, add new ones, and remove
        not-yet-started steps the message no longer lists. Returns the number of steps touched."""
        order = self._existing_order(record)
        patient = self.upsert_patient(patient_record)
        now = self.clock()
        order.patient_fk = patient.id
        order.order_control, order.order_status, order.updated_at = (record.order_control,
                                                                     record.order_status, now)
        existing = {(s.study_instance_uid, s.sps_id): s for s in self._order_steps(order)}
        procedures = {(p.study_instance_uid, p.requested_procedure_id): p
                      for p in self.session.scalars(select(RequestedProcedure)
                                                    .where(RequestedProcedure.order_fk == order.id))}
        touched = 0
        seen: set[tuple[str, str]] = set()
        for procedure_record in record.procedures:
            key = (procedure_record.study_instance_uid, procedure_record.requested_procedure_id)
            procedure = procedures.get(key)
            if procedure is None:
                procedure = self._add_procedure(order, procedure_record, now)
                procedures[key] = procedure
            else:
                procedure.accession_number = procedure_record.accession_number
                procedure.description = procedure_record.description
                procedure.updated_at = now
            for step_record in procedure_record.steps:
                step_key = (procedure_record.study_instance_uid, step_record.sps_id)
                seen.add(step_key)
                step = existing.get(step_key)
                if step is None:
                    self._check_step_is_new(*step_key)
                    self._add_step(procedure, patient, step_record.item, cause, now)
                elif step.sps_status not in FINAL:
                    item = worklist_item.build_item(step_record.item, patient.attributes, step.sps_status)
                    step.procedure_fk, step.patient_fk = procedure.id, patient.id
                    _store_item(step, item, now)
                touched += 1
        for key, step in existing.items():
            if key not in seen and step.sps_status in NOT_STARTED:
                log.info("step.removed_by_change", step_pk=step.id, cause=cause.text)
                self.session.delete(step)
                touched += 1
        self.session.flush()
        return touched

    def change_order_status(self, record: OrderRecord, to: StepStatus, cause: Cause) -> int:
        """Order-level status: CANCELED (steps not started), DISCONTINUED / COMPLETED (steps not final),
        STARTED (steps not started). Returns the number of steps changed."""
        order = self._existing_order(record)
        order.order_control, order.order_status, order.updated_at = (record.order_control,
                                                                     record.order_status, self.clock())
        allowed_from = NOT_STARTED if to in (StepStatus.CANCELED, StepStatus.STARTED) else OPEN
        changed = 0
        for step in self._order_steps(order):
            if step.sps_status in allowed_from and step.sps_status != to:
                self._set_status(step, to, cause)
                changed += 1
        return changed

    def _existing_order(self, record: OrderRecord) -> Order:
        order = self.find_order(record)
        if order is None:
            raise DomainError("unknown_order", f"no order {record.placer_order_number or record.filler_order_number}",
                              "order")
        return order

    def _order_steps(self, order: Order) -> list[ScheduledStep]:
        return list(self.session.scalars(
            select(ScheduledStep).join(RequestedProcedure)
            .where(RequestedProcedure.order_fk == order.id).order_by(ScheduledStep.id)))

    def _add_procedure(self, order: Order, record: ProcedureRecord, now: datetime) -> RequestedProcedure:
        procedure = RequestedProcedure(order_fk=order.id, requested_procedure_id=record.requested_procedure_id,
                                       accession_number=record.accession_number,
                                       study_instance_uid=record.study_instance_uid,
                                       description=record.description, created_at=now, updated_at=now)
        self.session.add(procedure)
        self.session.flush()
        return procedure

    def _check_step_is_new(self, study_instance_uid: str, sps_id: str) -> None:
        clash = self.session.scalars(select(ScheduledStep.id).where(
            ScheduledStep.study_instance_uid == study_instance_uid, ScheduledStep.sps_id == sps_id)).first()
        if clash is not None:
            raise DomainError("duplicate_step", f"step {sps_id} of study {study_instance_uid} exists already",
                              "step")

    def _add_step(self, procedure: RequestedProcedure, patient: Patient, mapped: JsonDataset, cause: Cause,
                  now: datetime) -> ScheduledStep:
        item = worklist_item.build_item(mapped, patient.attributes, StepStatus.SCHEDULED)
        step = ScheduledStep(procedure_fk=procedure.id, patient_fk=patient.id, created_at=now)
        _store_item(step, item, now)
        self.session.add(step)
        self.session.flush()
        self.session.add(StepTransition(step_fk=step.id, at=now, from_status="",
                                        to_status=StepStatus.SCHEDULED, cause=cause.text[:200],
                                        inbound_message_fk=cause.inbound_message_id))
        return step

    def _set_status(self, step: ScheduledStep, status: StepStatus, cause: Cause) -> None:
        now = self.clock()
        previous = step.sps_status
        item = copy.deepcopy(step.item)
        worklist_item.set_status(item, status)
        _store_item(step, item, now)
        self.session.add(StepTransition(step_fk=step.id, at=now, from_status=previous, to_status=status,
                                        cause=cause.text[:200], inbound_message_fk=cause.inbound_message_id))


_IDENTITY_TAGS = {tag_of("PatientID"), tag_of("IssuerOfPatientID")}


def _identity_attributes(key: PatientKey) -> JsonDataset:
    attributes = {tag_of("PatientID"): element("PatientID", key.patient_id)}
    if key.issuer:
        attributes[tag_of("IssuerOfPatientID")] = element("IssuerOfPatientID",
                                                                                     key.issuer)
    return attributes


def _store_item(step: ScheduledStep, item: JsonDataset, now: datetime) -> None:
    """Replace the step's item and recompute every indexed column from it."""
    step.item = item
    for column, column_value in worklist_item.index_columns(item).items():
        setattr(step, column, column_value)
    step.updated_at = now
