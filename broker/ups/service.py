"""The UPS operations (PS3.4 CC.2) on the broker's scheduled steps: rules, status codes, effects.

Each call is one transaction. A state change goes through :meth:`WorklistService.set_step_status`,
the path MPPS and HL7 take too, so the procedure state, the worklist status, the RIS status and the
subscribers' State Reports (:func:`broker.domain.ups_notify.step_status_changed`) all follow from it in the
same commit; the UPS-only state (Transaction UID, performer, UPS attributes) is in ``ups_workitems``.

Each change of a workitem is recorded in the audit trail in its transaction: N-CREATE as a Procedure
Record (C) of the new step, beside the Order Record (C) of the order it makes; a state change (N-ACTION
1, a cancel that takes effect) and an N-SET as a Procedure Record (U), its description saying what
changed. The requestor is the calling AE title at its address. Subscriptions change no patient's data
and are not recorded.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import orjson
import structlog
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Connection, Engine, Row, Select, and_, delete, insert, select, update

from broker.dicom_json import JsonDataset, element, tag_of, value
from broker.domain import ups_matching as matching
from broker.domain import ups_notify as notify
from broker.domain import ups_view as view
from broker.domain.auditing import ChangeAudit, step_subject
from broker.domain.records import Cause, OrderRecord, PatientKey, PatientRecord, ProcedureRecord, StepRecord
from broker.domain.services import DomainError, WorklistService
from broker.domain.states import StepStatus
from broker.domain.ups_states import (
    COMMENTS,
    CREATE_NOT_SCHEDULED,
    FINAL_STATE_NOT_MET,
    FINAL_STATES,
    NO_SUCH_UPS,
    NOT_APPROPRIATE_FOR_INSTANCE,
    REQUEST_CANCEL,
    SUCCESS,
    UNKNOWN_RECEIVING_AE,
    UpsState,
    decide_change,
    decide_set,
    step_status_for,
    ups_state,
)
from broker.outbox.outbox import OUTBOX
from broker.store.tables import ScheduledStep, UpsSubscription, UpsWorkitem, table_of
from broker.ups import prefilter
from broker.workflow.attributes import items, missing, tag, text, to_json
from broker.workflow.context import TransactionalService, WorkflowConfig
from broker.workflow.outcome import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    PROCESSING_FAILURE,
    Outcome,
    failure,
)

log = structlog.get_logger(__name__)

STEPS = table_of(ScheduledStep)
WORKITEMS = table_of(UpsWorkitem)
SUBSCRIPTIONS = table_of(UpsSubscription)

# N-ACTION Action Type ID (PS3.4 Table CC.2-1).
CHANGE_STATE, REQUEST_CANCEL_ACTION, SUBSCRIBE, UNSUBSCRIBE, SUSPEND_GLOBAL = 1, 2, 3, 4, 5
NO_SUCH_ACTION_TYPE = 0x0123

# PS3.4 Table CC.2.5-3, N-CREATE Type 1 (the SCU must send them with a value).
CREATE_TYPE_1 = ("ProcedureStepState", "ScheduledProcedureStepPriority", "ProcedureStepLabel",
                 "InputReadinessState", "ScheduledProcedureStepStartDateTime")
PRIORITIES = ("HIGH", "MEDIUM", "LOW")
READINESS = ("INCOMPLETE", "UNAVAILABLE", "READY")
# The attributes of a UPS State Report's subject that a filtered subscription and C-FIND may match.
ASSIGNMENT_KEYS = ("ScheduledStationNameCodeSequence", "ScheduledHumanPerformersSequence",
                   "ScheduledStationClassCodeSequence", "ScheduledStationGeographicLocationCodeSequence")
# N-SET may not change these (the identity of the workitem and its state).
NOT_SETTABLE = ("SOPInstanceUID", "SOPClassUID", "ProcedureStepState")
_PAGE = 500


def ups_status(status: int, comment: str = "", offending: tuple[int, ...] = ()) -> Outcome:
    """An outcome with the standard's words for a UPS status (and more, when given)."""
    words = COMMENTS.get(status, "")
    text_ = f"{words}: {comment}" if words and comment else (words or comment)
    if len(text_) > 64 and comment:  # Error Comment is LO: the specific part matters more
        text_ = comment
    if status == SUCCESS or 0xB000 <= status <= 0xBFFF:
        return Outcome(status, text_[:64] or None)
    return failure(status, text_, offending)


class UpsService(TransactionalService):
    """The UPS SCP's operations; the DICOM edge turns their :class:`Outcome` into the response.

    ``known_aes``: the AE titles events can be delivered to (``BROKER_DICOM_PEERS``); a subscription
    for another is refused with C308.
    """

    channel = notify.DIMSE
    """The channel of the subscriptions this service makes (UPS-RS: ``websocket``, any AE title)."""

    def __init__(self, engine: Engine, config: WorkflowConfig | None = None,
                 wake: Callable[[], None] | None = None, clock: Callable[[], datetime] = datetime.now,
                 *, known_aes: frozenset[str] = frozenset(), uid_root: str = "") -> None:
        super().__init__(engine, config, wake, clock)
        self.known_aes = known_aes
        self.uid_root = uid_root

    # --- reading -----------------------------------------------------------------------------------
    def _step(self, db: Connection, uid: str, lock: bool = False) -> Row[Any] | None:
        query = select(STEPS, WORKITEMS.c.transaction_uid, WORKITEMS.c.performer_ae,
                       WORKITEMS.c.attributes.label("ups_attributes"), WORKITEMS.c.step_fk.label("has_workitem")) \
            .select_from(STEPS.outerjoin(WORKITEMS, WORKITEMS.c.step_fk == STEPS.c.id)) \
            .where(STEPS.c.ups_instance_uid == uid)
        if lock and db.dialect.name == "postgresql":
            query = query.with_for_update(of=STEPS)
        return db.execute(query).first()

    @staticmethod
    def _view(step: Any, status: str | None = None) -> JsonDataset:
        return view.workitem(step.ups_instance_uid, step.item, status or step.sps_status, step.ups_attributes)

    def get(self, uid: str, tags: list[int] | None = None) -> Outcome:
        """N-GET: the workitem's attributes (those of ``tags`` when given; the Transaction UID never)."""
        with self.engine.connect() as db:
            step = self._step(db, uid)
        if step is None:
            return ups_status(NO_SUCH_UPS)
        ups = self._view(step)
        if tags:
            wanted = {f"{t:08X}" for t in tags}
            ups = {k: v for k, v in ups.items() if k in wanted} | {
                k: {"vr": _vr(k)} for k in wanted if k not in ups and k != tag_of("TransactionUID")}
        return Outcome(SUCCESS, attribute_list=Dataset.from_json(dict(sorted(ups.items()))))

    def find(self, identifier: Dataset) -> Iterator[Dataset]:
        """C-FIND: the workitems matching ``identifier`` with its return keys (raises
        :class:`~broker.domain.ups_matching.UnsupportedKey` for a key that cannot be used), in step order.

        The keys with an indexed column narrow the SQL (:mod:`broker.ups.prefilter`, a superset of the
        matches); every key is then matched on the UPS view. A narrowed query reads the candidate ids
        first, then their rows a page at a time: paging the narrowed query itself by id made the planners
        walk the primary key instead of the start / station index."""
        query: JsonDataset = identifier.to_json_dict(bulk_data_threshold=1 << 30)
        query.pop(tag_of("TransactionUID"), None)
        columns = (STEPS.c.id, STEPS.c.ups_instance_uid, STEPS.c.item, STEPS.c.sps_status,
                   WORKITEMS.c.attributes.label("ups_attributes"))
        joined = STEPS.outerjoin(WORKITEMS, WORKITEMS.c.step_fk == STEPS.c.id)
        dialect = self.engine.dialect.name
        pre = prefilter.build(query)
        if pre.narrows:
            with self.engine.connect() as db:
                ids = list(db.execute(prefilter.candidate_ids(pre, dialect)).scalars())
            pages: Iterator[list[Row[Any]]] = self._pages_of(
                select(*columns).select_from(joined), ids)
        else:
            pages = self._pages_after(select(*columns).select_from(joined)
                                      .where(STEPS.c.ups_instance_uid.is_not(None)))
        for rows in pages:
            for row in rows:
                item = row.item if isinstance(row.item, dict) else orjson.loads(row.item)
                ups = view.workitem(row.ups_instance_uid, item, row.sps_status, row.ups_attributes)
                if matching.dataset_matches(query, ups):
                    yield Dataset.from_json(matching.selected(query, ups))

    def _pages_of(self, statement: Select[Any], ids: list[int]) -> Iterator[list[Row[Any]]]:
        """The rows of ``ids`` (ascending), a page per read."""
        for start in range(0, len(ids), _PAGE):
            chunk = ids[start:start + _PAGE]
            with self.engine.connect() as db:
                yield list(db.execute(statement.where(STEPS.c.id.in_(chunk)).order_by(STEPS.c.id)).all())

    def _pages_after(self, statement: Select[Any]) -> Iterator[list[Row[Any]]]:
        """Every row of ``statement`` in id order, a page per read (keyset on id)."""
        after = 0
        while True:
            with self.engine.connect() as db:
                rows = list(db.execute(statement.where(STEPS.c.id > after).order_by(STEPS.c.id).limit(_PAGE)).all())
            yield rows
            if len(rows) < _PAGE:
                return
            after = rows[-1].id

    # --- N-CREATE ----------------------------------------------------------------------------------
    def create(self, uid: str, dataset: Dataset, calling_ae: str, host: str = "") -> Outcome:
        """N-CREATE: a new SCHEDULED workitem, which is also a new worklist item. ``calling_ae`` at
        ``host`` is the requestor of the audit records."""
        absent, empty = missing(dataset, CREATE_TYPE_1)
        if absent:
            return failure(MISSING_ATTRIBUTE, f"missing: {', '.join(absent)}", tuple(tag(k) for k in absent))
        if empty:
            return failure(MISSING_ATTRIBUTE_VALUE, f"no value: {', '.join(empty)}", tuple(tag(k) for k in empty))
        if text(dataset, "ProcedureStepState") != UpsState.SCHEDULED:
            return ups_status(CREATE_NOT_SCHEDULED, text(dataset, "ProcedureStepState"),
                              (tag("ProcedureStepState"),))
        if "TransactionUID" in dataset and text(dataset, "TransactionUID"):
            return failure(INVALID_ATTRIBUTE_VALUE, "N-CREATE may not carry a Transaction UID",
                           (tag("TransactionUID"),))
        for keyword, allowed in (("ScheduledProcedureStepPriority", PRIORITIES), ("InputReadinessState", READINESS)):
            if text(dataset, keyword) not in allowed:
                return failure(INVALID_ATTRIBUTE_VALUE, f"{keyword} {text(dataset, keyword)!r} is not valid",
                               (tag(keyword),))
        try:
            attributes = to_json(dataset)
        except Exception as exc:
            return failure(PROCESSING_FAILURE, f"attribute list cannot be stored: {type(exc).__name__}")
        return self.in_transaction(lambda db: self._create(db, uid, dataset, attributes, calling_ae, host),
                                   "ups.create")

    def _create(self, db: Connection, uid: str, dataset: Dataset, attributes: JsonDataset,
                calling_ae: str, host: str = "") -> Outcome:
        if db.execute(select(STEPS.c.id).where(STEPS.c.ups_instance_uid == uid)).first() is not None:
            return failure(DUPLICATE_SOP_INSTANCE, "a UPS with this SOP Instance UID exists")
        cause = Cause(f"UPS {uid} N-CREATE by {calling_ae}", event_kind="ups", event_ref=uid)
        # The step gets the SCU's UID below and is announced under it there, not by place_order.
        audit = self.change_audit(self.dicom_source(calling_ae, host))
        worklist = WorklistService(db, self.clock, procedures=self.procedures, announce_new_steps=False,
                                   audit=audit)  # the Order Record (C)
        patient, order = self._records(uid, dataset)
        try:
            worklist.place_order(patient, order, calling_ae, cause)
        except DomainError as exc:
            return failure(DUPLICATE_SOP_INSTANCE if exc.kind.startswith("duplicate") else PROCESSING_FAILURE,
                           exc.text)
        procedure = order.procedures[0]
        step_pk = db.execute(select(STEPS.c.id).where(
            STEPS.c.study_instance_uid == procedure.study_instance_uid,
            STEPS.c.sps_id == procedure.steps[0].sps_id)).scalar_one()
        now = self.clock()
        db.execute(update(STEPS).where(STEPS.c.id == step_pk).values(ups_instance_uid=uid))
        stored = {k: v for k, v in attributes.items() if k not in _NOT_STORED}
        db.execute(insert(WORKITEMS), {"step_fk": step_pk, "transaction_uid": "", "performer_ae": "",
                                       "attributes": stored, "updated_at": now})
        step = self._step(db, uid)
        assert step is not None
        ups = self._view(step)
        targets = notify.subscribers_of(db, uid, step.created_at, lambda: ups)
        notify.notify(db, targets, uid, notify.STATE_REPORT, notify.state_info(UpsState.SCHEDULED), now)
        assigned = _assignment(attributes)
        if assigned:
            notify.notify(db, targets, uid, notify.ASSIGNED, assigned, now)
        if audit is not None:
            audit.procedure(db, "C", step_subject(step, uid), f"UPS {UpsState.SCHEDULED}", now)
        log.info("ups.created", sop_instance_uid=uid, step_pk=step_pk, calling_ae=calling_ae)
        return Outcome(SUCCESS)

    def _records(self, uid: str, dataset: Dataset) -> tuple[PatientRecord, OrderRecord]:
        """The patient and the one-step order a UPS N-CREATE stands for (the worklist view of it)."""
        request = items(dataset, "ReferencedRequestSequence")
        first = request[0] if request else Dataset()
        study_uid = text(dataset, "StudyInstanceUID") or text(first, "StudyInstanceUID") \
            or str(generate_uid(prefix=self.uid_root or None, entropy_srcs=[uid, "study"]) if self.uid_root
                   else generate_uid(entropy_srcs=[uid, "study"]))
        sps_id = "U" + hashlib.sha1(uid.encode()).hexdigest()[:15].upper()
        start = text(dataset, "ScheduledProcedureStepStartDateTime")
        station = items(dataset, "ScheduledStationNameCodeSequence")
        performers = items(dataset, "ScheduledHumanPerformersSequence")
        label = text(dataset, "ProcedureStepLabel")
        sps: JsonDataset = {
            tag_of("ScheduledProcedureStepID"): element("ScheduledProcedureStepID", sps_id),
            tag_of("ScheduledProcedureStepStartDate"): element("ScheduledProcedureStepStartDate", start[:8]),
            tag_of("ScheduledProcedureStepStartTime"): element("ScheduledProcedureStepStartTime", start[8:14]),
            tag_of("ScheduledProcedureStepDescription"): element("ScheduledProcedureStepDescription", label),
            tag_of("ScheduledStationName"): element("ScheduledStationName",
                                                    text(station[0], "CodeValue")[:16] if station else ""),
            tag_of("ScheduledStationAETitle"): element("ScheduledStationAETitle", text(dataset, "WorklistLabel")[:16]),
            tag_of("ScheduledPerformingPhysicianName"): element(
                "ScheduledPerformingPhysicianName", text(performers[0], "HumanPerformerName") if performers else ""),
            tag_of("Modality"): element("Modality", ""),
        }
        workitem_codes = to_json(dataset).get(tag_of("ScheduledWorkitemCodeSequence"))
        if workitem_codes and workitem_codes.get("Value"):
            sps[tag_of("ScheduledProtocolCodeSequence")] = {"vr": "SQ", "Value": workitem_codes["Value"]}
        accession = text(first, "AccessionNumber")
        requested_id = text(first, "RequestedProcedureID") or sps_id
        description = text(first, "RequestedProcedureDescription") or label
        item: JsonDataset = {
            tag_of("AccessionNumber"): element("AccessionNumber", accession),
            tag_of("RequestedProcedureID"): element("RequestedProcedureID", requested_id),
            tag_of("RequestedProcedureDescription"): element("RequestedProcedureDescription", description[:64]),
            tag_of("StudyInstanceUID"): element("StudyInstanceUID", study_uid),
            tag_of("AdmissionID"): element("AdmissionID", text(dataset, "AdmissionID")),
            tag_of("ScheduledProcedureStepSequence"): element("ScheduledProcedureStepSequence", [sps]),
        }
        patient_attributes = {k: v for k, v in to_json(dataset).items()
                              if k in {tag_of(n) for n in ("PatientName", "PatientBirthDate", "PatientSex")}}
        patient = PatientRecord(PatientKey(text(dataset, "PatientID"), text(dataset, "IssuerOfPatientID")),
                                patient_attributes)
        order = OrderRecord("", "", "", "", "NW", "SC", [ProcedureRecord(
            requested_id, accession, study_uid, description[:64], [StepRecord(sps_id, dict(sorted(item.items())))])])
        return patient, order

    # --- N-SET -------------------------------------------------------------------------------------
    def set(self, uid: str, dataset: Dataset, calling_ae: str, host: str = "") -> Outcome:
        """N-SET: change UPS attributes (never the state); a progress change is a Progress Report, a new
        station or performer an Assigned event."""
        try:
            modification = to_json(dataset)
        except Exception as exc:
            return failure(PROCESSING_FAILURE, f"modification list cannot be stored: {type(exc).__name__}")
        return self.in_transaction(lambda db: self._set(db, uid, dataset, modification, calling_ae, host),
                                   "ups.set")

    def _set(self, db: Connection, uid: str, dataset: Dataset, modification: JsonDataset, calling_ae: str,
             host: str = "") -> Outcome:
        step = self._step(db, uid, lock=True)
        current = ups_state(step.sps_status) if step is not None else None
        verdict = decide_set(current, text(dataset, "TransactionUID"), step.transaction_uid or "" if step else "")
        if verdict != SUCCESS:
            return ups_status(verdict)
        assert step is not None
        if "ProcedureStepState" in dataset and text(dataset, "ProcedureStepState") != str(current):
            state = text(dataset, "ProcedureStepState")
            if state == UpsState.SCHEDULED:
                return ups_status(0xC303, "N-SET cannot change the state")
            return failure(INVALID_ATTRIBUTE_VALUE, "N-SET cannot change the state; use N-ACTION",
                           (tag("ProcedureStepState"),))
        for keyword in ("SOPInstanceUID", "SOPClassUID"):
            if keyword in dataset and text(dataset, keyword) not in ("", uid if keyword == "SOPInstanceUID"
                                                                       else view.UPS_PUSH):
                return failure(0x0105, f"{keyword} may not be changed", (tag(keyword),))
        changes = {k: v for k, v in modification.items() if k not in _NOT_STORED}
        now = self.clock()
        self._save_attributes(db, step, {**(step.ups_attributes or {}), **changes}, now)
        targets: list[str] | None = None
        progress = modification.get(tag_of("ProcedureStepProgressInformationSequence"))
        if progress is not None:
            targets = notify.subscribers_of(db, uid, step.created_at, lambda: self._view(step))
            notify.notify(db, targets, uid, notify.PROGRESS_REPORT,
                          {tag_of("ProcedureStepProgressInformationSequence"): progress}, now)
        assigned = _assignment(modification)
        if assigned:
            if targets is None:
                targets = notify.subscribers_of(db, uid, step.created_at, lambda: self._view(step))
            notify.notify(db, targets, uid, notify.ASSIGNED, assigned, now)
        self._audit(db, calling_ae, host, step, f"UPS attributes updated ({len(changes)})", now)
        log.info("ups.set", sop_instance_uid=uid, calling_ae=calling_ae, attributes=len(changes))
        return Outcome(SUCCESS)

    def _save_attributes(self, db: Connection, step: Row[Any], attributes: JsonDataset, now: datetime,
                         **values: str) -> None:
        if step.has_workitem is None:
            db.execute(insert(WORKITEMS), {"step_fk": step.id, "transaction_uid": values.get("transaction_uid", ""),
                                           "performer_ae": values.get("performer_ae", ""),
                                           "attributes": attributes, "updated_at": now})
        else:
            db.execute(update(WORKITEMS).where(WORKITEMS.c.step_fk == step.id).values(
                attributes=attributes, updated_at=now, **values))

    def _audit(self, db: Connection, calling_ae: str, host: str, step: Row[Any], description: str,
               now: datetime) -> None:
        """The Procedure Record (U) of a change to a workitem, when changes are recorded."""
        audit: ChangeAudit | None = self.change_audit(self.dicom_source(calling_ae, host))
        if audit is not None:
            audit.procedure(db, "U", step_subject(step, step.ups_instance_uid), description, now)

    # --- N-ACTION ----------------------------------------------------------------------------------
    def action(self, uid: str, action_type: int, dataset: Dataset, calling_ae: str, host: str = "") -> Outcome:
        """N-ACTION types 1-5 (change state, request cancel, subscribe, unsubscribe, suspend)."""
        handlers: dict[int, Callable[[Connection], Outcome]] = {
            CHANGE_STATE: lambda db: self._change_state(db, uid, dataset, calling_ae, host),
            REQUEST_CANCEL_ACTION: lambda db: self._request_cancel(db, uid, dataset, calling_ae, host),
            SUBSCRIBE: lambda db: self._subscribe(db, uid, dataset, calling_ae),
            UNSUBSCRIBE: lambda db: self._unsubscribe(db, uid, dataset, calling_ae),
            SUSPEND_GLOBAL: lambda db: self._suspend(db, uid, dataset, calling_ae),
        }
        work = handlers.get(action_type)
        if work is None:
            return failure(NO_SUCH_ACTION_TYPE, f"no action type {action_type} in UPS")
        outcome = self.in_transaction(work, f"ups.action{action_type}")
        log.info("ups.action", sop_instance_uid=uid, action_type=action_type, calling_ae=calling_ae,
                 status=hex(outcome.status))
        return outcome

    def _change_state(self, db: Connection, uid: str, dataset: Dataset, calling_ae: str, host: str = "") -> Outcome:
        if "ProcedureStepState" not in dataset or not text(dataset, "ProcedureStepState"):
            return failure(MISSING_ATTRIBUTE, "missing: ProcedureStepState", (tag("ProcedureStepState"),))
        try:
            target = UpsState(text(dataset, "ProcedureStepState"))
        except ValueError:
            return failure(INVALID_ATTRIBUTE_VALUE, f"Procedure Step State {text(dataset, 'ProcedureStepState')!r}"
                           " is not valid", (tag("ProcedureStepState"),))
        given = text(dataset, "TransactionUID")
        step = self._step(db, uid, lock=True)
        current = ups_state(step.sps_status) if step is not None else None
        decision = decide_change(current, target, given, (step.transaction_uid or "") if step is not None else "")
        if not decision.action:
            return ups_status(decision.status)
        assert step is not None and current is not None
        if decision.action == "claim" and not given:
            return failure(MISSING_ATTRIBUTE, "claiming needs a Transaction UID", (tag("TransactionUID"),))
        now = self.clock()
        attributes = dict(step.ups_attributes or {})
        if decision.action == "complete":
            lacking = _final_state_lacking(self._view(step))
            if lacking:
                return ups_status(FINAL_STATE_NOT_MET, "final state needs " + ", ".join(lacking))
        if decision.action == "cancel":
            _record_cancellation(attributes, now, "", "")
        values = {"transaction_uid": given, "performer_ae": calling_ae[:16]} if decision.action == "claim" else {}
        self._save_attributes(db, step, attributes, now, **values)
        cause = Cause(f"UPS {uid} {target} by {calling_ae}", event_kind="ups", event_ref=uid)
        WorklistService(db, self.clock, procedures=self.procedures).set_step_status(
            step.id, step_status_for(target, current), cause)
        self._audit(db, calling_ae, host, step, f"UPS {current} -> {target}", now)
        return Outcome(SUCCESS)

    def _request_cancel(self, db: Connection, uid: str, dataset: Dataset, calling_ae: str,
                        host: str = "") -> Outcome:
        step = self._step(db, uid, lock=True)
        if step is None:
            return ups_status(NO_SUCH_UPS)
        current = ups_state(step.sps_status)
        verdict = REQUEST_CANCEL[current]
        if isinstance(verdict, int):
            return ups_status(verdict)
        now = self.clock()
        reason = text(dataset, "ReasonForCancellation")
        if verdict == "cancel":
            attributes = dict(step.ups_attributes or {})
            _record_cancellation(attributes, now, reason, calling_ae)
            self._save_attributes(db, step, attributes, now)
            cause = Cause(f"UPS {uid} cancel requested by {calling_ae}", event_kind="ups", event_ref=uid)
            WorklistService(db, self.clock, procedures=self.procedures).set_step_status(
                step.id, step_status_for(UpsState.CANCELED, current), cause)
            self._audit(db, calling_ae, host, step, f"UPS {current} -> {UpsState.CANCELED} (cancel requested)", now)
            return Outcome(SUCCESS)
        # IN PROGRESS: the performer decides; it and the other subscribers are told (event type 2).
        targets = notify.subscribers_of(db, uid, step.created_at, lambda: self._view(step))
        if step.performer_ae and step.performer_ae in self.known_aes and step.performer_ae not in targets:
            targets.append(step.performer_ae)
        info: JsonDataset = {tag_of("RequestingAE"): element("RequestingAE", calling_ae[:16])}
        for keyword in ("ReasonForCancellation", "ContactDisplayName", "ContactURI",
                        "ProcedureStepDiscontinuationReasonCodeSequence"):
            if keyword in dataset:
                info[tag_of(keyword)] = to_json(dataset)[tag_of(keyword)]
        notify.notify(db, targets, uid, notify.CANCEL_REQUESTED, dict(sorted(info.items())), now)
        return Outcome(SUCCESS)

    # --- subscriptions (N-ACTION 3, 4, 5) ----------------------------------------------------------
    def _subscriber(self, dataset: Dataset) -> tuple[str, Outcome | None]:
        ae = text(dataset, "ReceivingAE")
        if not ae:
            return "", failure(MISSING_ATTRIBUTE, "missing: ReceivingAE", (tag("ReceivingAE"),))
        if self.channel == notify.DIMSE and ae not in self.known_aes:
            return ae, ups_status(UNKNOWN_RECEIVING_AE, f"{ae} is not in BROKER_DICOM_PEERS", (tag("ReceivingAE"),))
        return ae, None

    def _subscribe(self, db: Connection, uid: str, dataset: Dataset, calling_ae: str) -> Outcome:
        ae, problem = self._subscriber(dataset)
        if problem is not None:
            return problem
        lock = text(dataset, "DeletionLock").upper()
        if lock not in ("TRUE", "FALSE"):
            return failure(INVALID_ATTRIBUTE_VALUE if lock else MISSING_ATTRIBUTE,
                           "Deletion Lock must be TRUE or FALSE", (tag("DeletionLock"),))
        is_global = uid in (view.GLOBAL_SUBSCRIPTION, view.FILTERED_GLOBAL_SUBSCRIPTION)
        keys: JsonDataset | None = None
        if uid == view.FILTERED_GLOBAL_SUBSCRIPTION:
            keys = {k: v for k, v in to_json(dataset).items()
                    if k not in {tag_of("ReceivingAE"), tag_of("DeletionLock")} and not matching.is_universal(v)}
        step = None
        if not is_global:
            step = self._step(db, uid)
            if step is None:
                return ups_status(NO_SUCH_UPS)
        now = self.clock()
        db.execute(delete(SUBSCRIPTIONS).where(SUBSCRIPTIONS.c.subscriber_ae == ae,
                                               SUBSCRIPTIONS.c.workitem_uid == uid))
        db.execute(insert(SUBSCRIPTIONS), {"subscriber_ae": ae, "workitem_uid": uid, "is_global": is_global,
                                           "matching_keys": keys or None, "deletion_lock": lock == "TRUE",
                                           "suspended_at": None, "created_at": now, "channel": self.channel})
        notify.use_channel(db, ae, self.channel)
        if step is not None:  # the initial State Report
            notify.enqueue(db, ae, uid, notify.STATE_REPORT, notify.state_info(ups_state(step.sps_status)), now)
        else:
            self._initial_reports(db, ae, keys, now)
        log.info("ups.subscribed", subscriber=ae, workitem=uid, deletion_lock=lock, calling_ae=calling_ae,
                 filtered=bool(keys))
        return Outcome(SUCCESS)

    def _initial_reports(self, db: Connection, ae: str, keys: JsonDataset | None, now: datetime) -> None:
        """A global subscription's initial State Reports: one per workitem not yet final (matching the
        filter)."""
        open_statuses = [s for s in StepStatus if ups_state(s) not in FINAL_STATES]
        rows = db.execute(select(STEPS.c.id, STEPS.c.ups_instance_uid, STEPS.c.item, STEPS.c.sps_status,
                                 WORKITEMS.c.attributes.label("ups_attributes"))
                          .select_from(STEPS.outerjoin(WORKITEMS, WORKITEMS.c.step_fk == STEPS.c.id))
                          .where(STEPS.c.sps_status.in_([str(s) for s in open_statuses]),
                                 STEPS.c.ups_instance_uid.is_not(None)).order_by(STEPS.c.id))
        for row in rows:
            if keys and not matching.dataset_matches(keys, self._view(row)):
                continue
            notify.enqueue(db, ae, row.ups_instance_uid, notify.STATE_REPORT,
                           notify.state_info(ups_state(row.sps_status)), now)

    def _unsubscribe(self, db: Connection, uid: str, dataset: Dataset, calling_ae: str) -> Outcome:
        ae = text(dataset, "ReceivingAE")
        if not ae:
            return failure(MISSING_ATTRIBUTE, "missing: ReceivingAE", (tag("ReceivingAE"),))
        if uid in (view.GLOBAL_SUBSCRIPTION, view.FILTERED_GLOBAL_SUBSCRIPTION):
            # PS3.4 CC.2.3.2: unsubscribing globally ends every subscription of the AE.
            removed = db.execute(delete(SUBSCRIPTIONS).where(SUBSCRIPTIONS.c.subscriber_ae == ae)).rowcount
        else:
            if self._step(db, uid) is None:
                return ups_status(NO_SUCH_UPS)
            removed = db.execute(delete(SUBSCRIPTIONS).where(
                SUBSCRIPTIONS.c.subscriber_ae == ae, SUBSCRIPTIONS.c.workitem_uid == uid)).rowcount
        log.info("ups.unsubscribed", subscriber=ae, workitem=uid, removed=removed, calling_ae=calling_ae)
        return Outcome(SUCCESS)

    def _suspend(self, db: Connection, uid: str, dataset: Dataset, calling_ae: str) -> Outcome:
        ae = text(dataset, "ReceivingAE")
        if not ae:
            return failure(MISSING_ATTRIBUTE, "missing: ReceivingAE", (tag("ReceivingAE"),))
        if uid not in (view.GLOBAL_SUBSCRIPTION, view.FILTERED_GLOBAL_SUBSCRIPTION):
            return ups_status(NOT_APPROPRIATE_FOR_INSTANCE, "suspend applies to a global subscription")
        db.execute(update(SUBSCRIPTIONS).where(and_(SUBSCRIPTIONS.c.subscriber_ae == ae,
                                                    SUBSCRIPTIONS.c.is_global.is_(True),
                                                    SUBSCRIPTIONS.c.suspended_at.is_(None)))
                   .values(suspended_at=self.clock()))
        log.info("ups.suspended", subscriber=ae, calling_ae=calling_ae)
        return Outcome(SUCCESS)

    # --- SCP status ----------------------------------------------------------------------------------
    def scp_status_change(self, scp_status: str, only_if: Callable[[Connection], bool] | None = None) -> list[str]:
        """SCP Status Change (event type 4) to every subscriber: "RESTARTED" at start, "GOING DOWN" at
        shutdown. Returns the event ids (none without subscribers).

        ``only_if``: decides in the same transaction whether the change is the whole SCP's (in a
        cluster: this node joins a cluster that had no live node, or it is the last live node to
        leave, :class:`broker.cluster.nodes.Node`); false queues nothing. Subscribers hear of the
        SCP, which is the cluster, not of one node behind the load balancer."""
        queued: list[str] = []
        decided: list[bool] = []

        def work(db: Connection) -> Outcome:
            decided.append(only_if is None or only_if(db))
            if decided[-1]:
                aes = notify.all_subscribers(db)
                queued.extend(notify.notify(db, aes, view.GLOBAL_SUBSCRIPTION, notify.SCP_STATUS_CHANGE,
                                            notify.scp_status_info(scp_status), self.clock()))
            return Outcome(SUCCESS)

        self.in_transaction(work, "ups.scp_status")
        if queued:
            log.info("ups.scp_status_change", scp_status=scp_status, subscribers=len(queued))
        elif decided and not decided[-1]:
            log.info("ups.scp_status_unchanged", scp_status=scp_status, reason="other nodes are live")
        return queued

    def going_down(self, wait: float, only_if: Callable[[Connection], bool] | None = None) -> bool:
        """At shutdown: tell the subscribers (type 4, GOING DOWN; ``only_if`` as for
        :meth:`scp_status_change`) and wait up to ``wait`` seconds for the reports to be delivered,
        while the event path still runs. Returns whether all were."""
        queued = self.scp_status_change("GOING DOWN", only_if)
        deadline = time.monotonic() + wait
        while queued and time.monotonic() < deadline:
            with self.engine.connect() as db:
                open_ = db.execute(select(OUTBOX.c.id).where(OUTBOX.c.event_id.in_(queued),
                                                             OUTBOX.c.status != "done").limit(1)).first()
            if open_ is None:
                return True
            time.sleep(0.05)
        return not queued


# Kept out of ups_workitems.attributes: the view sets them, or they are not UPS attributes to keep.
_NOT_STORED = {tag_of(k) for k in ("TransactionUID", "ProcedureStepState", "SOPInstanceUID", "SOPClassUID",
                                   "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID",
                                   "PatientBirthDate", "PatientSex")}


def _assignment(attributes: JsonDataset) -> JsonDataset:
    """The event information of UPS Assigned (type 5): the station / performer attributes set."""
    return {tag_of(k): attributes[tag_of(k)] for k in ASSIGNMENT_KEYS
            if tag_of(k) in attributes and attributes[tag_of(k)].get("Value")}


def _final_state_lacking(ups: JsonDataset) -> list[str]:
    """What a COMPLETED UPS must have (PS3.4 Table CC.2.5-3, Final State): a UPS Performed Procedure
    Sequence item with the Performed Procedure Step End DateTime."""
    performed = (ups.get(tag_of("UnifiedProcedureStepPerformedProcedureSequence")) or {}).get("Value") or []
    if not performed:
        return ["UnifiedProcedureStepPerformedProcedureSequence"]
    if not value(performed[0] or {}, "PerformedProcedureStepEndDateTime"):
        return ["PerformedProcedureStepEndDateTime"]
    return []


def _record_cancellation(attributes: JsonDataset, now: datetime, reason: str, requesting_ae: str) -> None:
    """Procedure Step Cancellation DateTime (and reason) in the Progress Information Sequence."""
    key = tag_of("ProcedureStepProgressInformationSequence")
    progress = dict(((attributes.get(key) or {}).get("Value") or [{}])[0] or {})
    progress[tag_of("ProcedureStepCancellationDateTime")] = element("ProcedureStepCancellationDateTime",
                                                                    now.strftime("%Y%m%d%H%M%S"))
    if reason:
        progress[tag_of("ReasonForCancellation")] = element("ReasonForCancellation", reason)
    attributes[key] = {"vr": "SQ", "Value": [dict(sorted(progress.items()))]}


def _vr(json_tag: str) -> str:
    from pydicom.datadict import dictionary_VR

    try:
        return str(dictionary_VR(int(json_tag, 16)))
    except KeyError:
        return "UN"
