"""MPPS N-CREATE and N-SET (PS3.4 F.7.2) as domain operations: rules, status codes, effects.

Each call is one transaction: the MPPS instance, the step and procedure states, the instances it
references, the commitment request, the outbox rows (RIS status, forwards) and the audit record
(a Procedure Record per linked step: C for N-CREATE, U for N-SET) commit together before
the edge answers the modality. Forwarding failures happen later, in tasks, and never reach the
modality.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from pydicom import Dataset
from sqlalchemy import Connection, Engine, Row, bindparam, insert, select, update

from broker.audit.events import Action
from broker.dicom_json import JsonDataset, sequence_items, value
from broker.dicom_json import has_value as json_has_value
from broker.domain.auditing import ChangeAudit, ProcedureSubject, step_subject
from broker.domain.procedure_states import ProcedureState
from broker.domain.records import Cause, PatientKey
from broker.domain.services import WorklistService
from broker.domain.states import FINAL, NOT_STARTED, StepStatus
from broker.outbox import outbox
from broker.store.tables import MppsInstance, RequestedProcedure, ScheduledStep, table_of
from broker.workflow.attributes import has_value, items, missing, tag, text, to_json
from broker.workflow.commitment import CommitmentRequests, Requester
from broker.workflow.context import TransactionalService, WorkflowConfig
from broker.workflow.instances import InstanceRef, record_instances
from broker.workflow.outcome import (
    DUPLICATE_SOP_INSTANCE,
    ERROR_ID_MAY_NO_LONGER_BE_UPDATED,
    INVALID_ATTRIBUTE_VALUE,
    MAY_NO_LONGER_BE_UPDATED,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    NO_SUCH_ATTRIBUTE,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    SUCCESS,
    Outcome,
    failure,
)

log = structlog.get_logger(__name__)

MPPS = table_of(MppsInstance)
STEPS = table_of(ScheduledStep)
PROCEDURES = table_of(RequestedProcedure)

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
PPS_STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)

# PS3.4 Table F.7.2-1: attributes the SCU must send with a value in N-CREATE (Type 1).
CREATE_TYPE_1 = ("ScheduledStepAttributesSequence", "PerformedProcedureStepID", "PerformedStationAETitle",
                 "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                 "PerformedProcedureStepStatus", "Modality")
# PS3.4 Table F.7.2-1, N-SET column "Not allowed": the patient, the scheduling link and the
# identity of the performed step. A repeat of the stored value is tolerated (some modalities send
# their whole attribute set again); a different value is refused with 0x0105 (spec section 4).
NOT_SETTABLE = ("ScheduledStepAttributesSequence", "PatientName", "PatientID", "IssuerOfPatientID",
                "PatientBirthDate", "PatientSex", "ReferencedPatientSequence", "PerformedProcedureStepID",
                "PerformedStationAETitle", "PerformedStationName", "PerformedLocation",
                "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "Modality", "StudyID")
# PS3.4 Table F.7.2-1, "Final State" column: what a COMPLETED or DISCONTINUED PPS must carry.
FINAL_STATE = ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime", "PerformedSeriesSequence")

# Statements built once (their construction cost more CPU than running them).
_MPPS_ID_BY_UID = select(MPPS.c.id).where(MPPS.c.sop_instance_uid == bindparam("uid"))
_MPPS_BY_UID = select(MPPS).where(MPPS.c.sop_instance_uid == bindparam("uid"))
_MPPS_BY_UID_LOCKING = _MPPS_BY_UID.with_for_update()
_INSERT_MPPS = insert(MPPS)
_UPDATE_MPPS = (update(MPPS).where(MPPS.c.id == bindparam("pk"))
                .values(dataset=bindparam("document"), status=bindparam("new_status"), updated_at=bindparam("now")))
_STEPS_BY_KEY = select(STEPS.c.id, STEPS.c.procedure_fk, STEPS.c.sps_status, STEPS.c.sps_id, STEPS.c.patient_id,
                       STEPS.c.issuer_of_patient_id, STEPS.c.accession_number, STEPS.c.study_instance_uid).where(
    STEPS.c.study_instance_uid == bindparam("study_uid"), STEPS.c.sps_id == bindparam("sps_id"))

_STEP_STATUS = {IN_PROGRESS: StepStatus.STARTED, COMPLETED: StepStatus.COMPLETED,
                DISCONTINUED: StepStatus.DISCONTINUED}
_PROCEDURE_STATE = {IN_PROGRESS: ProcedureState.STARTED, COMPLETED: ProcedureState.COMPLETED,
                    DISCONTINUED: ProcedureState.DISCONTINUED}


class MppsService(TransactionalService):
    """The MPPS SCP's operations; the DICOM edge turns their :class:`Outcome` into the response."""

    def __init__(self, engine: Engine, config: WorkflowConfig | None = None,
                 wake: Callable[[], None] | None = None, clock: Callable[[], datetime] = datetime.now,
                 *, commitment: CommitmentRequests | None = None) -> None:
        super().__init__(engine, config, wake, clock)
        self.commitment = commitment or Requester(self.config, clock)

    # --- N-CREATE ----------------------------------------------------------------------------------
    def create(self, sop_instance_uid: str, dataset: Dataset, calling_ae: str, host: str = "") -> Outcome:
        """N-CREATE: a new PPS, IN PROGRESS, linked to its scheduled step(s) or kept as unscheduled.
        ``calling_ae`` at ``host`` is the requestor of the audit record."""
        problem = _check_create(dataset)
        if problem is not None:
            log.info("mpps.create_refused", sop_instance_uid=sop_instance_uid, status=hex(problem.status),
                     comment=problem.error_comment, calling_ae=calling_ae)
            return problem
        try:
            document = to_json(dataset)
        except Exception as exc:  # a value pydicom cannot encode: the request is not usable
            return failure(PROCESSING_FAILURE, f"attribute list cannot be stored: {type(exc).__name__}")
        return self.in_transaction(
            lambda db: self._create(db, sop_instance_uid, dataset, document, calling_ae, host), "mpps.create")

    def _create(self, db: Connection, uid: str, dataset: Dataset, document: JsonDataset,
                calling_ae: str, host: str = "") -> Outcome:
        if db.execute(_MPPS_ID_BY_UID, {"uid": uid}).first() is not None:
            return failure(DUPLICATE_SOP_INSTANCE, "an MPPS with this SOP Instance UID exists")
        steps = _linked_steps(db, document)
        now = self.clock()
        first = steps[0] if steps else None
        study_uid = text(items(dataset, "ScheduledStepAttributesSequence")[0], "StudyInstanceUID")
        db.execute(_INSERT_MPPS, {
            "sop_instance_uid": uid, "status": IN_PROGRESS, "step_fk": first.id if first else None,
            "procedure_fk": first.procedure_fk if first else None, "study_instance_uid": study_uid,
            "calling_ae": calling_ae[:16], "dataset": document, "unscheduled": not steps,
            "created_at": now, "updated_at": now})
        if steps:
            self._apply_status(db, uid, IN_PROGRESS, steps)
        else:
            log.info("mpps.unscheduled", sop_instance_uid=uid, calling_ae=calling_ae)
        self._forward(db, uid, "N-CREATE", document, now)
        self._audit(self.change_audit(self.dicom_source(calling_ae, host)), db, "C", f"MPPS {IN_PROGRESS}",
                    steps, document, now)
        log.info("mpps.created", sop_instance_uid=uid, steps=[s.id for s in steps], calling_ae=calling_ae)
        return Outcome(SUCCESS)

    # --- N-SET -------------------------------------------------------------------------------------
    def update(self, sop_instance_uid: str, dataset: Dataset, calling_ae: str, host: str = "") -> Outcome:
        """N-SET: change the attributes a PPS may still change; COMPLETED / DISCONTINUED end it.
        ``calling_ae`` at ``host`` is the requestor of the audit record."""
        try:
            modification = to_json(dataset)
        except Exception as exc:
            return failure(PROCESSING_FAILURE, f"modification list cannot be stored: {type(exc).__name__}")
        return self.in_transaction(
            lambda db: self._update(db, sop_instance_uid, dataset, modification, calling_ae, host), "mpps.update")

    def _update(self, db: Connection, uid: str, dataset: Dataset, modification: JsonDataset,
                calling_ae: str, host: str = "") -> Outcome:
        # on PostgreSQL, two N-SETs on one instance run one after the other
        query = _MPPS_BY_UID_LOCKING if db.dialect.name == "postgresql" else _MPPS_BY_UID
        row = db.execute(query, {"uid": uid}).first()
        if row is None:
            return failure(NO_SUCH_OBJECT_INSTANCE, "no MPPS with this SOP Instance UID")
        if row.status != IN_PROGRESS:
            # PS3.4 F.7.2.2: only an IN PROGRESS PPS may be updated.
            return failure(PROCESSING_FAILURE, MAY_NO_LONGER_BE_UPDATED, error_id=ERROR_ID_MAY_NO_LONGER_BE_UPDATED)
        changed = [k for k in NOT_SETTABLE if k in dataset and modification.get(_hex(k)) != row.dataset.get(_hex(k))]
        if changed:
            return failure(NO_SUCH_ATTRIBUTE, f"may not be changed by N-SET: {', '.join(changed)}",
                           tuple(tag(k) for k in changed))
        status = text(dataset, "PerformedProcedureStepStatus") or row.status
        if "PerformedProcedureStepStatus" in dataset and status not in PPS_STATUSES:
            return failure(INVALID_ATTRIBUTE_VALUE, f"Performed Procedure Step Status {status!r} is not valid",
                           (tag("PerformedProcedureStepStatus"),))
        # A sequence in N-SET replaces the whole sequence: every element replaces the stored one. The
        # merged attributes are read as DICOM JSON (a pydicom Dataset of them cost ~0.6 ms per N-SET).
        document = {**row.dataset, **modification}
        if status in (COMPLETED, DISCONTINUED):
            # PS3.4 F.7.2.2.2 / Table F.7.2-1 "Final State": the SCP refuses to end a PPS whose final-state
            # attributes are missing; it is a processing failure (0110) of this N-SET, not a missing
            # attribute of the modification list (0120), which is why the Error Comment names them.
            lacking = [k for k in FINAL_STATE if not json_has_value(document, k)]
            if lacking:
                return failure(PROCESSING_FAILURE, f"{status} needs {', '.join(lacking)}",
                               tuple(tag(k) for k in lacking))
        now = self.clock()
        db.execute(_UPDATE_MPPS, {"pk": row.id, "document": document, "new_status": status, "now": now})
        audit = self.change_audit(self.dicom_source(calling_ae, host))
        steps = _linked_steps(db, document) if status != row.status or audit is not None else []
        if status != row.status:
            if steps:
                self._apply_status(db, uid, status, steps)
            if status in (COMPLETED, DISCONTINUED):
                self._record_performed_instances(db, uid, document, row.procedure_fk, now)
                if status == COMPLETED and row.procedure_fk is not None:
                    self.commitment.request_commitment(db, row.procedure_fk)
        self._forward(db, uid, "N-SET", modification, now)
        self._audit(audit, db, "U", f"MPPS {status}" if status != row.status else "MPPS attributes updated",
                    steps, document, now)
        log.info("mpps.updated", sop_instance_uid=uid, status=status, calling_ae=calling_ae)
        return Outcome(SUCCESS)

    # --- effects -----------------------------------------------------------------------------------
    @staticmethod
    def _audit(audit: ChangeAudit | None, db: Connection, action: Action, description: str, steps: list[Row[Any]],
               document: JsonDataset, now: datetime) -> None:
        """A Procedure Record for each linked step; for an unscheduled PPS one naming what it carries."""
        if audit is None:
            return
        subjects = [step_subject(step) for step in steps]
        if not subjects:
            scheduled = sequence_items(document, "ScheduledStepAttributesSequence")
            first = scheduled[0] if scheduled else {}
            subjects = [ProcedureSubject(PatientKey(value(document, "PatientID"), value(document, "IssuerOfPatientID")),
                                         value(first, "StudyInstanceUID"), value(first, "AccessionNumber"))]
        for subject in subjects:
            audit.procedure(db, action, subject, description, now)

    def _apply_status(self, db: Connection, uid: str, status: str, steps: list[Row[Any]]) -> None:
        """The PPS status moves its steps (SPS Status) and, through them, their procedures."""
        cause = Cause(f"MPPS {uid} {status}", event_kind="mpps", event_ref=uid)
        worklist = WorklistService(db, self.clock, procedures=self.procedures)
        step_status = _STEP_STATUS[status]
        followed: set[int] = set()  # procedures a moved step moved (or tried to) already
        for step in steps:
            movable = step.sps_status in NOT_STARTED if status == IN_PROGRESS else step.sps_status not in FINAL
            if movable and worklist.set_step_status(step.id, step_status, cause):
                followed.add(step.procedure_fk)
            elif not movable:
                log.info("mpps.step_not_moved", sop_instance_uid=uid, step_pk=step.id, sps_status=step.sps_status)
        # A step HL7 had moved already still moves its procedure for this MPPS.
        for procedure_pk in dict.fromkeys(s.procedure_fk for s in steps if s.procedure_fk not in followed):
            self.procedures.advance(db, procedure_pk, _PROCEDURE_STATE[status], cause)

    def _record_performed_instances(self, db: Connection, uid: str, document: JsonDataset,
                                    procedure_pk: int | None, now: datetime) -> None:
        scheduled = sequence_items(document, "ScheduledStepAttributesSequence")
        study_uid = value(scheduled[0], "StudyInstanceUID") if scheduled else ""
        refs = [InstanceRef(value(image, "ReferencedSOPInstanceUID"), value(image, "ReferencedSOPClassUID"),
                            value(series, "SeriesInstanceUID"), study_uid, mpps_uid=uid, procedure_fk=procedure_pk)
                for series in sequence_items(document, "PerformedSeriesSequence")
                for keyword in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence")
                for image in sequence_items(series, keyword)]
        record_instances(db, refs, now)

    def _forward(self, db: Connection, uid: str, operation: str, document: JsonDataset, now: datetime) -> None:
        for target in self.config.forward_aes:
            outbox.add_event(db, outbox.MPPS_FORWARD, {"target": target, "operation": operation,
                                                       "sop_instance_uid": uid, "dataset": document},
                             f"mpps:{target}:{uid}", now)


def _check_create(dataset: Dataset) -> Outcome | None:
    """The N-CREATE rules that need no database: Type 1 attributes, PPS Status IN PROGRESS."""
    absent, empty = missing(dataset, CREATE_TYPE_1)
    for position, item in enumerate(items(dataset, "ScheduledStepAttributesSequence")):
        if "StudyInstanceUID" not in item:
            absent.append(f"ScheduledStepAttributesSequence[{position}].StudyInstanceUID")
        elif not has_value(item, "StudyInstanceUID"):
            empty.append(f"ScheduledStepAttributesSequence[{position}].StudyInstanceUID")
    if absent:
        return failure(MISSING_ATTRIBUTE, f"missing: {', '.join(absent)}", _tags(absent))
    if empty:
        return failure(MISSING_ATTRIBUTE_VALUE, f"no value: {', '.join(empty)}", _tags(empty))
    status = text(dataset, "PerformedProcedureStepStatus")
    if status != IN_PROGRESS:
        return failure(INVALID_ATTRIBUTE_VALUE, f"N-CREATE needs Performed Procedure Step Status IN PROGRESS, "
                       f"not {status}", (tag("PerformedProcedureStepStatus"),))
    return None


def _linked_steps(db: Connection, document: JsonDataset) -> list[Row[Any]]:
    """The scheduled steps named by the Scheduled Step Attribute Sequence (Study Instance UID + SPS ID)."""
    found: dict[int, Any] = {}
    for item in sequence_items(document, "ScheduledStepAttributesSequence"):
        study_uid = value(item, "StudyInstanceUID").strip()
        sps_id = value(item, "ScheduledProcedureStepID").strip()
        if not (study_uid and sps_id):
            continue
        found.update((step.id, step) for step in db.execute(_STEPS_BY_KEY, {"study_uid": study_uid,
                                                                             "sps_id": sps_id}))
    return list(found.values())


def _hex(keyword: str) -> str:
    return f"{tag(keyword):08X}"


def _tags(names: list[str]) -> tuple[int, ...]:
    return tuple(tag(name.rsplit(".", 1)[-1]) for name in names)
