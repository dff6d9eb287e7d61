"""Domain services: each applies one command inside the caller's transaction.

The caller (HL7 intake today, the REST API later) opens the transaction, calls one of these, and
commits; the answer to the sender is built only after that commit. Nothing here knows HL7 or DICOM
networking: input is records (DICOM JSON), output is stored rows, failures are :class:`DomainError`.

The statements are SQLAlchemy Core on the ORM's tables: the intake's hot path costs a handful of
statements per order, which the ORM's unit of work made several times slower on this hardware. On
PostgreSQL, where each statement is a network round trip, a new order's four inserts (five with a
new patient) are one statement (see :func:`_one_step_order`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import (
    Connection,
    Row,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)

from broker.audit.events import Action
from broker.dicom_json import JsonDataset, element, tag_of, value
from broker.domain import ups_notify, worklist_item
from broker.domain.auditing import ChangeAudit, step_subject
from broker.domain.procedure_tracker import ProcedureTracker
from broker.domain.records import Cause, OrderRecord, PatientKey, PatientRecord, ProcedureRecord
from broker.domain.states import FINAL, NOT_STARTED, OPEN, StepStatus
from broker.domain.ups_identity import derived_ups_uid
from broker.store.prepared import Prepared
from broker.store.tables import ORDERS, PATIENTS, PROCEDURES, STEP_TRANSITIONS, STEPS

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _KeyedInsert:
    """An INSERT of one row whose new key the caller needs, in two forms (see _insert_row): with
    RETURNING (PostgreSQL) and without (SQLite, which reports the key as the cursor's lastrowid)."""

    returning: Prepared
    plain: Prepared


def _keyed_insert(table: Table) -> _KeyedInsert:
    return _KeyedInsert(Prepared(insert(table).returning(table.c.id)), Prepared(insert(table)))


# Statements of the hot path, built once: executing a prebuilt statement with a parameter dict skips
# SQLAlchemy's per-call construction and cache-key work (measured: about half of the CPU per order).
# Those of a new order are also Prepared (broker.store.prepared): run on the driver, without
# SQLAlchemy's per-statement work (40-110 us each).
_PATIENT_BY_KEY = select(PATIENTS).where(PATIENTS.c.patient_id == bindparam("patient_id"),
                                         PATIENTS.c.issuer == bindparam("issuer"))
_PATIENT_BY_PK = select(PATIENTS).where(PATIENTS.c.id == bindparam("pk"))
_INSERT_PATIENT = _keyed_insert(PATIENTS)
_UPDATE_PATIENT = Prepared(update(PATIENTS).where(PATIENTS.c.id == bindparam("pk")))
# One lookup by placer or filler order number; an empty number matches nothing.
_ORDER_BY_NUMBER = select(ORDERS).where(or_(
    and_(bindparam("placer") != "", ORDERS.c.placer_order_number == bindparam("placer"),
         ORDERS.c.placer_issuer == bindparam("placer_issuer")),
    and_(bindparam("filler") != "", ORDERS.c.filler_order_number == bindparam("filler"),
         ORDERS.c.filler_issuer == bindparam("filler_issuer")),
)).order_by(ORDERS.c.id)
_INSERT_ORDER = _keyed_insert(ORDERS)
_STEP_BY_KEY = select(STEPS.c.id).where(STEPS.c.study_instance_uid == bindparam("study_instance_uid"),
                                        STEPS.c.sps_id == bindparam("sps_id"))


def _order_id_by(number: str, number_column: Any, issuer_column: Any) -> Any:
    """The key of an order with this placer or filler number (NULL for none, or for an empty number).

    One equality lookup on one index, not :data:`_ORDER_BY_NUMBER`'s OR with ORDER BY id: a plan made
    for no particular values (PostgreSQL's generic plan of a prepared statement) of that one can walk
    the primary key from its first row and test every order, which for a new order (no match) means
    every row of ``orders``.
    """
    return (select(ORDERS.c.id)
            .where(bindparam(number) != "", number_column == bindparam(number),
                   issuer_column == bindparam(number + "_issuer"))
            .limit(1).scalar_subquery())


# A new order's four checks in one round trip: the patient row (NULLs when unknown), whether the
# order number is taken, whether the first step's key is taken, whether anyone subscribes to UPS
# workitems globally (whose new steps must then be announced to them).
_ANCHOR = select(literal(1).label("one")).subquery("anchor")
_NEW_ORDER_LOOKUP = Prepared(select(
    PATIENTS,
    func.coalesce(_order_id_by("placer", ORDERS.c.placer_order_number, ORDERS.c.placer_issuer),
                  _order_id_by("filler", ORDERS.c.filler_order_number, ORDERS.c.filler_issuer)
                  ).label("existing_order_id"),
    _STEP_BY_KEY.limit(1).scalar_subquery().label("clashing_step_id"),
    ups_notify.global_subscription_id().label("global_subscription_id"),
).select_from(_ANCHOR.outerjoin(PATIENTS, and_(PATIENTS.c.patient_id == bindparam("patient_id"),
                                               PATIENTS.c.issuer == bindparam("issuer")))))
_INSERT_PROCEDURE = _keyed_insert(PROCEDURES)
_INSERT_STEP = _keyed_insert(STEPS)
_UPDATE_STEP = update(STEPS).where(STEPS.c.id == bindparam("pk"))
_STEP_BY_PK = select(STEPS).where(STEPS.c.id == bindparam("pk"))
_INSERT_TRANSITION = Prepared(insert(STEP_TRANSITIONS))
# On PostgreSQL a new order of one procedure with one step (the common ORM^O01) is inserted by one
# statement: see _one_step_order.
_SHARED_COLUMNS = {"created_at": "now", "updated_at": "now", "at": "now", "patient_fk": "patient_fk"}


# A new patient's columns that the statement with_patient=True takes from its step's columns (the
# step's item carries the patient's attributes, so they are equal: checked before it is used).
_PATIENT_FROM_STEP = {"patient_id": "patient_id", "issuer": "issuer_of_patient_id", "patient_name": "patient_name",
                      "birth_date": "patient_birth_date", "sex": "patient_sex"}


def _one_step_order(*, with_patient: bool = False) -> Select[Any]:
    """One statement that inserts an order, its procedure, its step and the step's first transition:
    INSERT ... RETURNING in WITH, each row taking its parent's key from the one before. It returns
    the order's key. ``with_patient``: it also inserts the order's new patient (CTE ``a``), whose key
    order and step take, which saves the patient's own round trip.

    Parameters are named after the columns, prefixed ``o_`` (order), ``p_`` (procedure), ``s_``
    (step) and ``t_`` (transition), except the shared ``now`` and ``patient_fk``: psycopg caches the
    conversion of a statement of at most 50 parameters (and 4096 bytes), and this one has 44. The new
    patient adds one, ``a_attributes``: its other columns are the step's (see _PATIENT_FROM_STEP). Only
    for one row per table: the sub-statements of WITH run in no fixed order, so sibling rows could get
    their keys out of message order. PostgreSQL only: SQLite has no INSERT inside WITH.
    """
    params: dict[str, Any] = {}

    def param(name: str, column: Any) -> Any:
        return params.setdefault(name, bindparam(name, type_=column.type))

    shared = {"now": param("now", ORDERS.c.created_at), "patient_fk": param("patient_fk", ORDERS.c.patient_fk)}
    patient = None
    if with_patient:
        values = {name: param("s_" + step_column, STEPS.c[step_column])
                  for name, step_column in _PATIENT_FROM_STEP.items()}
        patient = insert(PATIENTS).values({
            **values, "attributes": param("a_attributes", PATIENTS.c.attributes),
            "created_at": shared["now"], "updated_at": shared["now"]}).returning(PATIENTS.c.id).cte("a")
        shared["patient_fk"] = select(patient.c.id).scalar_subquery()

    def row(table: Table, prefix: str, parent: str = "", parent_key: Any = None) -> Any:
        columns: dict[str, Any] = {}
        for column in table.c:
            if column.name in _SHARED_COLUMNS:
                columns[column.name] = shared[_SHARED_COLUMNS[column.name]]
            elif column.name == parent:
                columns[column.name] = select(parent_key).scalar_subquery()
            elif column.name != "id":
                columns[column.name] = param(prefix + column.name, column)
        return insert(table).values(columns).returning(table.c.id).cte(prefix.rstrip("_"))

    order = row(ORDERS, "o_")
    procedure = row(PROCEDURES, "p_", "order_fk", order.c.id)
    step = row(STEPS, "s_", "procedure_fk", procedure.c.id)
    statement = select(order.c.id).add_cte(procedure, step, row(STEP_TRANSITIONS, "t_", "step_fk", step.c.id))
    return statement.add_cte(patient) if patient is not None else statement


_INSERT_ONE_STEP_ORDER = Prepared(_one_step_order())
_INSERT_ONE_STEP_ORDER_AND_PATIENT = Prepared(_one_step_order(with_patient=True))


class DomainError(Exception):
    """A command cannot be applied; ``kind`` says why (unknown_order, duplicate_order, ...)."""

    def __init__(self, kind: str, text: str, subject: str = "") -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text
        self.subject = subject  # which part of the command: "order", "step", "patient", "prior_patient"


@dataclass
class StoredPatient:
    """The patient a command works on: primary key, identity and current attributes."""

    pk: int
    key: PatientKey
    attributes: JsonDataset


class WorklistService:
    """Patients, orders and scheduled steps: the commands of spec section 1."""

    def __init__(self, connection: Connection, clock: Callable[[], datetime] = datetime.now,
                 procedures: ProcedureTracker | None = None, *, announce_new_steps: bool = True,
                 audit: ChangeAudit | None = None) -> None:
        self.db = connection
        self.clock = clock
        # The audit records of the commands (Order and Patient Records, the Procedure Records of ADT
        # A10), in the command's transaction; None: not recorded. Step status changes made through
        # set_step_status are recorded by their callers (MPPS, UPS), which know the event.
        self.audit = audit
        # A new step is a new UPS workitem, announced to global subscribers (broker.domain.ups_notify.step_scheduled);
        # False for UPS N-CREATE, which gives the step its own UID and announces it itself.
        self.announce_new_steps = announce_new_steps
        if procedures is None:
            procedures = ProcedureTracker(clock=clock)
        # Every step status change also moves the step's procedure (broker.domain.procedure_states).
        self.procedures = procedures
        # one round trip instead of one per row (each costs ~0.4 ms of wall time on PostgreSQL)
        self._one_statement_orders = connection.dialect.name == "postgresql"
        # On SQLite a new row's key is the cursor's lastrowid (every table's INTEGER PRIMARY KEY is its
        # rowid): RETURNING would cost a result set per insert, ~10-15 us of CPU each (measured), three
        # or four times per new order.
        self._keys_from_lastrowid = connection.dialect.name == "sqlite"

    def _insert_row(self, statement: _KeyedInsert, params: dict[str, Any]) -> int:
        """Insert one row; returns its primary key."""
        if self._keys_from_lastrowid:
            return statement.plain.lastrowid(self.db, params)
        return int(statement.returning.one(self.db, params)[0])

    # --- patients ----------------------------------------------------------------------------------
    def _patient_row(self, key: PatientKey) -> Row[Any] | None:
        return self.db.execute(_PATIENT_BY_KEY, {"patient_id": key.patient_id, "issuer": key.issuer}).first()

    def _patient_by_pk(self, pk: int) -> Row[Any]:
        return self.db.execute(_PATIENT_BY_PK, {"pk": pk}).one()

    def _insert_patient(self, key: PatientKey, attributes: JsonDataset) -> int:
        now = self.clock()
        return self._insert_row(_INSERT_PATIENT, {
            "patient_id": key.patient_id, "issuer": key.issuer, "created_at": now, "updated_at": now,
            **_patient_columns(attributes)})

    def _surviving_row(self, row: Row[Any]) -> Row[Any]:
        seen = {row.id}
        while row.merged_into_id is not None:
            row = self._patient_by_pk(row.merged_into_id)
            if row.id in seen:  # pragma: no cover - merges are checked for cycles when made
                break
            seen.add(row.id)
        return row

    def upsert_patient(self, record: PatientRecord) -> StoredPatient:
        """Create the patient or update the attributes the record carries; follows earlier merges."""
        return self._upsert_patient(record, self._patient_row(record.key))

    def _upsert_patient(self, record: PatientRecord, row: Row[Any] | None) -> StoredPatient:
        now = self.clock()
        if row is None:
            attributes = {**record.attributes, **_identity_attributes(record.key)}
            return StoredPatient(self._insert_patient(record.key, attributes), record.key, attributes)
        incoming = record.attributes
        if row.merged_into_id is not None:
            surviving = self._surviving_row(row)
            log.info("patient.redirected_to_surviving", patient_pk=row.id, surviving_pk=surviving.id)
            row = surviving
            incoming = {k: v for k, v in incoming.items() if k not in _IDENTITY_TAGS}
        key = PatientKey(row.patient_id, row.issuer)
        attributes = {**(row.attributes or {}), **incoming, **_identity_attributes(key)}
        if attributes != row.attributes:
            _UPDATE_PATIENT.rowcount(self.db, {"pk": row.id, "updated_at": now, **_patient_columns(attributes)})
        return StoredPatient(row.id, key, attributes)

    def update_patient(self, record: PatientRecord, cause: Cause) -> int:
        """ADT A01/A04/A05/A08/A31: update the patient; propagate to its open items. Returns their count."""
        row = self._patient_row(record.key)
        patient = self._upsert_patient(record, row)
        if self.audit is not None:
            self.audit.patient(self.db, "C" if row is None else "U", patient.key, self.clock())
        return self._refresh_items(patient, self._steps_of(patient.pk, OPEN))

    def merge_patient(self, surviving: PatientRecord, prior: PatientKey, cause: Cause,
                      *, change_identifier: bool = False) -> int:
        """ADT A40 (merge) / A47 (identifier change): move the prior patient's items to the surviving one.

        Returns the number of items moved. A merge of a patient into itself, or into a patient that was
        itself merged into the prior one, is refused as circular.
        """
        if surviving.key == prior:
            raise DomainError("circular_merge", f"patient {prior} cannot be merged into itself",
                              "prior_patient")
        prior_row = self._patient_row(prior)
        if change_identifier and prior_row is not None and self._patient_row(surviving.key) is None:
            # A47 to an unused identifier: the same patient gets a new ID.
            self.db.execute(update(PATIENTS).where(PATIENTS.c.id == prior_row.id).values(
                patient_id=surviving.key.patient_id, issuer=surviving.key.issuer))
            patient = self.upsert_patient(surviving)
            if self.audit is not None:
                self.audit.patient(self.db, "U", patient.key, self.clock(), merged=prior)
            return self._refresh_items(patient, self._steps_of(patient.pk, None))
        target = self.upsert_patient(surviving)
        if prior_row is None:
            prior_row = self._patient_by_pk(self._insert_patient(prior, _identity_attributes(prior)))
        target_row = self._patient_by_pk(target.pk)
        if prior_row.id == target.pk or self._surviving_row(target_row).id == prior_row.id:
            raise DomainError("circular_merge", f"patient {surviving.key} was merged into {prior}; "
                              "merging back would be circular", "prior_patient")
        if prior_row.merged_into_id is not None and self._surviving_row(prior_row).id != target.pk:
            raise DomainError("already_merged", f"patient {prior} was already merged into another patient",
                              "prior_patient")
        steps = self._steps_of(prior_row.id, None)
        self.db.execute(update(ORDERS).where(ORDERS.c.patient_fk == prior_row.id).values(patient_fk=target.pk))
        self.db.execute(update(STEPS).where(STEPS.c.patient_fk == prior_row.id).values(patient_fk=target.pk))
        self.db.execute(update(PATIENTS).where(PATIENTS.c.id == prior_row.id).values(
            merged_into_id=target.pk, updated_at=self.clock()))
        moved = self._refresh_items(target, steps)
        if self.audit is not None:
            self.audit.patient(self.db, "U", target.key, self.clock(), merged=prior)
        log.info("patient.merged", prior_pk=prior_row.id, surviving_pk=target.pk, items=moved)
        return moved

    def patient_arrived(self, key: PatientKey, day: str, admission_id: str, cause: Cause) -> int:
        """ADT A10: the patient's SCHEDULED steps of ``day`` (YYYYMMDD) become ARRIVED."""
        row = self._patient_row(key)
        if row is None:
            return 0
        row = self._surviving_row(row)
        steps = [s for s in self._steps_of(row.id, {StepStatus.SCHEDULED}) if s.sps_start_date == day]
        if admission_id and any(s.admission_id == admission_id for s in steps):
            steps = [s for s in steps if s.admission_id == admission_id]
        for step in steps:
            self._set_status(step, StepStatus.ARRIVED, cause)
            if self.audit is not None:
                self.audit.procedure(self.db, "U", step_subject(step), f"{step.sps_status} -> ARRIVED", self.clock())
        return len(steps)

    def _steps_of(self, patient_pk: int, statuses: Iterable[str] | None) -> list[Row[Any]]:
        query = select(STEPS).where(STEPS.c.patient_fk == patient_pk)
        if statuses is not None:
            query = query.where(STEPS.c.sps_status.in_([str(s) for s in statuses]))
        return list(self.db.execute(query.order_by(STEPS.c.id)))

    def _refresh_items(self, patient: StoredPatient, steps: list[Row[Any]]) -> int:
        now = self.clock()
        for step in steps:
            item = dict(step.item)
            worklist_item.apply_patient_attributes(item, patient.attributes)
            self._write_item(step.id, item, now, patient_fk=patient.pk)
        return len(steps)

    # --- orders ------------------------------------------------------------------------------------
    def find_order(self, record: OrderRecord) -> Row[Any] | None:
        """The stored order with the record's placer order number or its filler order number."""
        if not (record.placer_order_number or record.filler_order_number):
            return None
        return self.db.execute(_ORDER_BY_NUMBER, {
            "placer": record.placer_order_number, "placer_issuer": record.placer_issuer,
            "filler": record.filler_order_number, "filler_issuer": record.filler_issuer}).first()

    def place_order(self, patient_record: PatientRecord, record: OrderRecord, sender: str,
                    cause: Cause) -> int:
        """ORC-1 NW: a new order with its requested procedures and steps, all SCHEDULED.

        Returns the number of steps created.
        """
        steps = [(p.study_instance_uid, st.sps_id) for p in record.procedures for st in p.steps]
        first_uid, first_sps = steps[0] if steps else ("", "")
        found = _NEW_ORDER_LOOKUP.one(self.db, {
            "patient_id": patient_record.key.patient_id, "issuer": patient_record.key.issuer,
            "placer": record.placer_order_number, "placer_issuer": record.placer_issuer,
            "filler": record.filler_order_number, "filler_issuer": record.filler_issuer,
            "study_instance_uid": first_uid, "sps_id": first_sps})
        if found.existing_order_id is not None:  # an empty order number matches no order
            number = record.placer_order_number or record.filler_order_number
            raise DomainError("duplicate_order", f"order {number} exists already", "order")
        if steps and found.clashing_step_id is not None:
            raise _duplicate_step(first_uid, first_sps)
        for study_instance_uid, sps_id in steps[1:]:
            self._check_step_is_new(study_instance_uid, sps_id)
        announce = self.announce_new_steps and found.global_subscription_id is not None
        one_statement = self._one_statement_orders and len(record.procedures) == 1 and len(steps) == 1
        if one_statement and found.id is None:  # a new patient: inserted by the order's statement
            attributes = {**patient_record.attributes, **_identity_attributes(patient_record.key)}
            patient = StoredPatient(0, patient_record.key, attributes)  # its key is not known here
        else:
            patient = self._upsert_patient(patient_record, found if found.id is not None else None)
        now = self.clock()
        order = {
            "patient_fk": patient.pk, "sender": sender[:200], "placer_order_number": record.placer_order_number,
            "placer_issuer": record.placer_issuer, "filler_order_number": record.filler_order_number,
            "filler_issuer": record.filler_issuer, "order_control": record.order_control,
            "order_status": record.order_status, "created_at": now, "updated_at": now}
        if one_statement:
            created = self._place_one_step_order(order, patient, record, cause, now, new_patient=found.id is None,
                                                 announce=announce)
        else:
            order_pk = self._insert_row(_INSERT_ORDER, order)
            created = 0
            for procedure_record in record.procedures:
                procedure_pk = self._add_procedure(order_pk, procedure_record, now)
                for step_record in procedure_record.steps:
                    self._add_step(procedure_pk, patient, step_record.item, cause, now, announce=announce)
                    created += 1
        if self.audit is not None:
            self.audit.order(self.db, "C", patient.key, record, now)
        return created

    def _place_one_step_order(self, order: dict[str, Any], patient: StoredPatient, record: OrderRecord,
                              cause: Cause, now: datetime, *, new_patient: bool = False, announce: bool = False) -> int:
        """place_order's four inserts as one statement (see _one_step_order); ``new_patient``: the
        patient is not stored yet (``patient.pk`` is unset) and the statement inserts it too;
        ``announce``: the new step is announced to the UPS global subscribers."""
        def prefixed(prefix: str, row: dict[str, Any]) -> dict[str, Any]:
            return {prefix + name: value for name, value in row.items() if name not in _SHARED_COLUMNS}

        [procedure] = record.procedures
        [step] = procedure.steps
        item = worklist_item.build_item(step.item, patient.attributes, StepStatus.SCHEDULED)
        step_row = self._step_row(patient, item, now)
        statement = _INSERT_ONE_STEP_ORDER
        params = {"now": now, "patient_fk": patient.pk, **prefixed("o_", order),
                  **prefixed("p_", self._procedure_row(procedure, now)), **prefixed("s_", step_row),
                  **prefixed("t_", self._transition_row("", StepStatus.SCHEDULED, cause, now))}
        if new_patient:
            patient_row = {"patient_id": patient.key.patient_id, "issuer": patient.key.issuer,
                           **_patient_columns(patient.attributes)}
            if all(patient_row[name] == step_row[column] for name, column in _PATIENT_FROM_STEP.items()):
                statement = _INSERT_ONE_STEP_ORDER_AND_PATIENT
                del params["patient_fk"]
                params["a_attributes"] = patient_row["attributes"]
            else:  # pragma: no cover - the step's patient columns come from the same attributes
                params["patient_fk"] = self._insert_patient(patient.key, patient.attributes)
        statement.one(self.db, params)
        if announce:
            ups_notify.step_scheduled(self.db, step_row["ups_instance_uid"], item, now)
        return 1

    def replace_order(self, patient_record: PatientRecord, record: OrderRecord, cause: Cause) -> int:
        """ORC-1 XO: update the steps keyed by Study Instance UID + SPS ID, add new ones, and remove
        not-yet-started steps the message no longer lists. Returns the number of steps touched."""
        order = self._existing_order(record)
        patient = self.upsert_patient(patient_record)
        now = self.clock()
        self.db.execute(update(ORDERS).where(ORDERS.c.id == order.id).values(
            patient_fk=patient.pk, order_control=record.order_control, order_status=record.order_status,
            updated_at=now))
        existing = {(s.study_instance_uid, s.sps_id): s for s in self._order_steps(order.id)}
        procedures = {(p.study_instance_uid, p.requested_procedure_id): p.id for p in self.db.execute(
            select(PROCEDURES.c.id, PROCEDURES.c.study_instance_uid, PROCEDURES.c.requested_procedure_id)
            .where(PROCEDURES.c.order_fk == order.id))}
        touched = 0
        seen: set[tuple[str, str]] = set()
        for procedure_record in record.procedures:
            key = (procedure_record.study_instance_uid, procedure_record.requested_procedure_id)
            procedure_pk = procedures.get(key)
            if procedure_pk is None:
                procedure_pk = procedures[key] = self._add_procedure(order.id, procedure_record, now)
            else:
                self.db.execute(update(PROCEDURES).where(PROCEDURES.c.id == procedure_pk).values(
                    accession_number=procedure_record.accession_number,
                    description=procedure_record.description, updated_at=now))
            for step_record in procedure_record.steps:
                step_key = (procedure_record.study_instance_uid, step_record.sps_id)
                seen.add(step_key)
                step = existing.get(step_key)
                if step is None:
                    self._check_step_is_new(*step_key)
                    self._add_step(procedure_pk, patient, step_record.item, cause, now,
                                   announce=self.announce_new_steps)
                elif step.sps_status not in FINAL:
                    item = worklist_item.build_item(step_record.item, patient.attributes, step.sps_status)
                    self._write_item(step.id, item, now, patient_fk=patient.pk, procedure_fk=procedure_pk)
                touched += 1
        removed = [s.id for k, s in existing.items() if k not in seen and s.sps_status in NOT_STARTED]
        if removed:
            log.info("step.removed_by_change", step_pks=removed, cause=cause.text)
            self.db.execute(delete(STEP_TRANSITIONS).where(STEP_TRANSITIONS.c.step_fk.in_(removed)))
            self.db.execute(delete(STEPS).where(STEPS.c.id.in_(removed)))
        if self.audit is not None:
            self.audit.order(self.db, "U", patient.key, record, now)
        return touched + len(removed)

    def change_order_status(self, record: OrderRecord, to: StepStatus, cause: Cause) -> int:
        """Order-level status: CANCELED (steps not started), DISCONTINUED / COMPLETED (steps not final),
        STARTED (steps not started). Returns the number of steps changed."""
        order = self._existing_order(record)
        now = self.clock()
        self.db.execute(update(ORDERS).where(ORDERS.c.id == order.id).values(
            order_control=record.order_control, order_status=record.order_status, updated_at=now))
        allowed_from = NOT_STARTED if to in (StepStatus.CANCELED, StepStatus.STARTED) else OPEN
        changed = 0
        steps = self._order_steps(order.id)
        for step in steps:
            if step.sps_status in allowed_from and step.sps_status != to:
                self._set_status(step, to, cause)
                changed += 1
        if self.audit is not None:
            # a cancelled or discontinued order is a deleted one (D); a started or completed one changed (U)
            action: Action = "D" if to in (StepStatus.CANCELED, StepStatus.DISCONTINUED) else "U"
            patient = self._patient_by_pk(order.patient_fk)
            self.audit.order(self.db, action, PatientKey(patient.patient_id, patient.issuer), record, now, steps)
        return changed

    def _existing_order(self, record: OrderRecord) -> Row[Any]:
        order = self.find_order(record)
        if order is None:
            number = record.placer_order_number or record.filler_order_number
            raise DomainError("unknown_order", f"no order {number}", "order")
        return order

    def _order_steps(self, order_pk: int) -> list[Row[Any]]:
        return list(self.db.execute(
            select(STEPS).join(PROCEDURES, STEPS.c.procedure_fk == PROCEDURES.c.id)
            .where(PROCEDURES.c.order_fk == order_pk).order_by(STEPS.c.id)))

    @staticmethod
    def _procedure_row(record: ProcedureRecord, now: datetime) -> dict[str, Any]:
        return {"requested_procedure_id": record.requested_procedure_id,
                "accession_number": record.accession_number, "study_instance_uid": record.study_instance_uid,
                "description": record.description, "state": "SCHEDULED", "created_at": now, "updated_at": now}

    def _add_procedure(self, order_pk: int, record: ProcedureRecord, now: datetime) -> int:
        return self._insert_row(_INSERT_PROCEDURE, {"order_fk": order_pk, **self._procedure_row(record, now)})

    def _check_step_is_new(self, study_instance_uid: str, sps_id: str) -> None:
        clash = self.db.execute(_STEP_BY_KEY, {"study_instance_uid": study_instance_uid, "sps_id": sps_id}).first()
        if clash is not None:
            raise _duplicate_step(study_instance_uid, sps_id)

    def _add_step(self, procedure_pk: int, patient: StoredPatient, mapped: JsonDataset, cause: Cause,
                  now: datetime, *, announce: bool = False) -> int:
        """A new SCHEDULED step; ``announce``: told to the UPS global subscribers (one indexed query)."""
        item = worklist_item.build_item(mapped, patient.attributes, StepStatus.SCHEDULED)
        row = self._step_row(patient, item, now)
        step_pk = self._insert_row(_INSERT_STEP, {"procedure_fk": procedure_pk, **row})
        self._record_transition(step_pk, "", StepStatus.SCHEDULED, cause, now)
        if announce:
            ups_notify.step_scheduled(self.db, row["ups_instance_uid"], item, now)
        return step_pk

    @staticmethod
    def _step_row(patient: StoredPatient, item: JsonDataset, now: datetime) -> dict[str, Any]:
        columns = worklist_item.index_columns(item)
        # the step is also a UPS workitem (broker.ups): its UID, derived from the step's identity
        columns["ups_instance_uid"] = derived_ups_uid(columns["study_instance_uid"], columns["sps_id"])
        return {"patient_fk": patient.pk, "item": item, "created_at": now, "updated_at": now, **columns}

    def set_step_status(self, step_pk: int, status: StepStatus, cause: Cause) -> bool:
        """Set one step's status (MPPS): recorded as a step transition and followed by its procedure.
        Returns False when the step does not exist or has that status already."""
        step = self.db.execute(_STEP_BY_PK, {"pk": step_pk}).first()
        if step is None or step.sps_status == status:
            return False
        self._set_status(step, status, cause)
        return True

    def _set_status(self, step: Row[Any], status: StepStatus, cause: Cause) -> None:
        now = self.clock()
        item = dict(step.item)
        worklist_item.set_status(item, status)
        self._write_item(step.id, item, now)
        self._record_transition(step.id, step.sps_status, status, cause, now)
        ups_notify.step_status_changed(self.db, step, status, now)  # the UPS view's subscribers
        self.procedures.follow_step(self.db, step.procedure_fk, status, cause)

    def _record_transition(self, step_pk: int, from_status: str, to_status: str, cause: Cause,
                           now: datetime) -> None:
        _INSERT_TRANSITION.rowcount(self.db, {"step_fk": step_pk,
                                              **self._transition_row(from_status, to_status, cause, now)})

    @staticmethod
    def _transition_row(from_status: str, to_status: str, cause: Cause, now: datetime) -> dict[str, Any]:
        return {"at": now, "from_status": from_status, "to_status": str(to_status), "cause": cause.text[:200],
                "inbound_message_fk": cause.inbound_message_id}

    def _write_item(self, step_pk: int, item: JsonDataset, now: datetime, **links: int) -> None:
        """Replace a step's item and recompute every indexed column from it."""
        self.db.execute(_UPDATE_STEP, {"pk": step_pk, "item": item, "updated_at": now, **links,
                                       **worklist_item.index_columns(item)})


_IDENTITY_TAGS = {tag_of("PatientID"), tag_of("IssuerOfPatientID")}


def _duplicate_step(study_instance_uid: str, sps_id: str) -> DomainError:
    return DomainError("duplicate_step", f"step {sps_id} of study {study_instance_uid} exists already", "step")


def _identity_attributes(key: PatientKey) -> JsonDataset:
    attributes = {tag_of("PatientID"): element("PatientID", key.patient_id)}
    if key.issuer:
        attributes[tag_of("IssuerOfPatientID")] = element("IssuerOfPatientID", key.issuer)
    return attributes


def _patient_columns(attributes: JsonDataset) -> dict[str, Any]:
    return {"attributes": attributes, "patient_name": value(attributes, "PatientName"),
            "birth_date": value(attributes, "PatientBirthDate"), "sex": value(attributes, "PatientSex")}
