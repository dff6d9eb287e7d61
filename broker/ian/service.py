"""IAN N-CREATE (PS3.4 R) as a domain operation: store the notification and the availability of
each instance, correlate it with a procedure, and move that procedure to IMAGES AVAILABLE.

An IAN carries no patient and no accession number: it is correlated by the MPPS it references
(Referenced Performed Procedure Step Sequence) and else by Study Instance UID.

An IAN for a study the broker does not know is accepted (0x0000) and stored without a procedure:
PS3.4 R defines no failure for it, the notification is true whatever the broker knows, and a
failure status would only make the archive resend something that can never succeed. Nothing of any
procedure changes; the instances are kept (procedure NULL) for reconciliation.

An IAN correlated with a procedure is recorded in the audit trail in its transaction: a Procedure
Record (U) of that procedure, its description saying what became available. One for an unknown study
is not: it changes no patient's data.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import structlog
from pydicom import Dataset
from sqlalchemy import Connection, Engine, insert, select

from broker.dicom_json import JsonDataset
from broker.domain.auditing import procedure_subject
from broker.domain.procedure_states import ProcedureState
from broker.domain.records import Cause
from broker.store.tables import IanNotification, MppsInstance, RequestedProcedure, table_of
from broker.workflow.attributes import has_value, items, tag, text, to_json
from broker.workflow.commitment import CommitmentRequests, Requester
from broker.workflow.context import TransactionalService, WorkflowConfig
from broker.workflow.instances import InstanceRef, record_instances
from broker.workflow.outcome import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    PROCESSING_FAILURE,
    SUCCESS,
    Outcome,
    failure,
)

log = structlog.get_logger(__name__)

NOTIFICATIONS = table_of(IanNotification)
MPPS = table_of(MppsInstance)
PROCEDURES = table_of(RequestedProcedure)

# PS3.3 C.4.23 (Instance Availability Notification Module), Instance Availability (0008,0056).
AVAILABILITY = ("ONLINE", "NEARLINE", "OFFLINE", "UNAVAILABLE")
RETRIEVABLE = ("ONLINE", "NEARLINE")
# Type 1 attributes of each Referenced SOP Sequence item.
SOP_TYPE_1 = ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID", "InstanceAvailability", "RetrieveAETitle")


class IanService(TransactionalService):
    """The IAN SCP's operation; the DICOM edge turns its :class:`Outcome` into the response."""

    def __init__(self, engine: Engine, config: WorkflowConfig | None = None,
                 wake: Callable[[], None] | None = None, clock: Callable[[], datetime] = datetime.now,
                 *, commitment: CommitmentRequests | None = None) -> None:
        super().__init__(engine, config, wake, clock)
        self.commitment = commitment or Requester(self.config, clock)

    def create(self, sop_instance_uid: str, dataset: Dataset, calling_ae: str, host: str = "") -> Outcome:
        """N-CREATE of an IAN instance; ``calling_ae`` at ``host`` is the requestor of the audit record."""
        problem = _check(dataset)
        if problem is not None:
            log.info("ian.refused", sop_instance_uid=sop_instance_uid, status=hex(problem.status),
                     comment=problem.error_comment, calling_ae=calling_ae)
            return problem
        try:
            document = to_json(dataset)
        except Exception as exc:
            return failure(PROCESSING_FAILURE, f"attribute list cannot be stored: {type(exc).__name__}")
        return self.in_transaction(
            lambda db: self._create(db, sop_instance_uid, dataset, document, calling_ae, host), "ian.create")

    def _create(self, db: Connection, uid: str, dataset: Dataset, document: JsonDataset, calling_ae: str,
                host: str = "") -> Outcome:
        if db.execute(select(NOTIFICATIONS.c.id).where(NOTIFICATIONS.c.sop_instance_uid == uid)).first():
            return failure(DUPLICATE_SOP_INSTANCE, "an IAN with this SOP Instance UID exists")
        study_uid = text(dataset, "StudyInstanceUID")
        mpps_uids = [text(i, "ReferencedSOPInstanceUID")
                     for i in items(dataset, "ReferencedPerformedProcedureStepSequence")]
        procedure_pk = _correlate(db, study_uid, [u for u in mpps_uids if u])
        now = self.clock()
        db.execute(insert(NOTIFICATIONS), {"sop_instance_uid": uid, "study_instance_uid": study_uid,
                                           "procedure_fk": procedure_pk, "dataset": document,
                                           "calling_ae": calling_ae[:16], "received_at": now})
        mpps_uid = next((u for u in mpps_uids if u), "")
        refs = [InstanceRef(text(sop, "ReferencedSOPInstanceUID"), text(sop, "ReferencedSOPClassUID"),
                            text(series, "SeriesInstanceUID"), study_uid, text(sop, "InstanceAvailability"),
                            text(sop, "RetrieveAETitle"), mpps_uid, procedure_pk)
                for series in items(dataset, "ReferencedSeriesSequence")
                for sop in items(series, "ReferencedSOPSequence")]
        record_instances(db, refs, now)
        if procedure_pk is None:
            log.info("ian.unknown_study", sop_instance_uid=uid, calling_ae=calling_ae, instances=len(refs))
            return Outcome(SUCCESS)
        available = any(r.availability in RETRIEVABLE for r in refs)
        if available:
            self.procedures.advance(db, procedure_pk, ProcedureState.IMAGES_AVAILABLE,
                                    Cause(f"IAN {uid}", event_kind="ian", event_ref=uid))
            self.commitment.request_commitment(db, procedure_pk)
        audit = self.change_audit(self.dicom_source(calling_ae, host))
        subject = procedure_subject(db, procedure_pk) if audit is not None else None
        if audit is not None and subject is not None:
            states = ", ".join(sorted({r.availability for r in refs}))
            audit.procedure(db, "U", subject, f"IAN: images available ({len(refs)} instance(s))" if available
                            else f"IAN: {len(refs)} instance(s) {states}", now)
        log.info("ian.stored", sop_instance_uid=uid, procedure_pk=procedure_pk, instances=len(refs))
        return Outcome(SUCCESS)


def _check(dataset: Dataset) -> Outcome | None:
    """PS3.4 Table R.3-1 / PS3.3 C.4.23: Type 1 attributes, and the Instance Availability defined terms."""
    absent: list[str] = []
    empty: list[str] = []
    for keyword in ("StudyInstanceUID", "ReferencedSeriesSequence"):
        (absent if keyword not in dataset else empty if not has_value(dataset, keyword) else []).append(keyword)
    if "ReferencedPerformedProcedureStepSequence" not in dataset:  # Type 2: present, may be empty
        absent.append("ReferencedPerformedProcedureStepSequence")
    for series in items(dataset, "ReferencedSeriesSequence"):
        for keyword in ("SeriesInstanceUID", "ReferencedSOPSequence"):
            (absent if keyword not in series else empty if not has_value(series, keyword) else []).append(keyword)
        for sop in items(series, "ReferencedSOPSequence"):
            for keyword in SOP_TYPE_1:
                (absent if keyword not in sop else empty if not has_value(sop, keyword) else []).append(keyword)
    if absent:
        names = list(dict.fromkeys(absent))
        return failure(MISSING_ATTRIBUTE, f"missing: {', '.join(names)}", tuple(tag(n) for n in names))
    if empty:
        names = list(dict.fromkeys(empty))
        return failure(MISSING_ATTRIBUTE_VALUE, f"no value: {', '.join(names)}", tuple(tag(n) for n in names))
    for series in items(dataset, "ReferencedSeriesSequence"):
        for sop in items(series, "ReferencedSOPSequence"):
            if text(sop, "InstanceAvailability") not in AVAILABILITY:
                return failure(INVALID_ATTRIBUTE_VALUE, f"Instance Availability {text(sop, 'InstanceAvailability')!r}"
                               " is not ONLINE, NEARLINE, OFFLINE or UNAVAILABLE", (tag("InstanceAvailability"),))
    return None


def _correlate(db: Connection, study_uid: str, mpps_uids: list[str]) -> int | None:
    """The procedure of the referenced MPPS, else the (first) procedure with the Study Instance UID."""
    if mpps_uids:
        linked = db.execute(select(MPPS.c.procedure_fk).where(MPPS.c.sop_instance_uid.in_(mpps_uids),
                                                              MPPS.c.procedure_fk.is_not(None))).first()
        if linked is not None:
            return int(linked.procedure_fk)
    found = db.execute(select(PROCEDURES.c.id).where(PROCEDURES.c.study_instance_uid == study_uid)
                       .order_by(PROCEDURES.c.id).limit(1)).scalar_one_or_none()
    return int(found) if found is not None else None
