"""Finished procedures leave the database ``retention_procedure_days`` after their last change.

A procedure is finished when it is COMPLETED, DISCONTINUED, CANCELED, IMAGES AVAILABLE or ARCHIVED and
every step of it is final; COMMIT FAILED is kept (a human must look, as for a failed outbox event). Its
last change is the newest of the procedure's and its steps' ``updated_at``. It is held (kept, counted
as held) while something still needs it: an outbox event not done that concerns it (its RIS status,
an MPPS forward of its MPPS, a commitment request, a UPS event of its steps), a commitment request
still waiting for the archive, or a UPS subscription with a deletion lock on one of its steps (PS3.4
CC.2.3.1: the workitem stays until that subscriber unsubscribes).

What goes with it, child rows first (so no foreign key, cascading or not, is relied on): commitment
items and requests, instance availability and IAN rows linked to it, its MPPS, the UPS data of its steps
(workitem attributes, per-workitem subscriptions), the steps' transitions and the steps; then, unless
the timeline is kept, its own timeline and row, its order once no procedure of it is left, and the
order's patient once nothing names it any more (no order, no step, no merge pointing to it, and no
change of its own within the retention). With ``retention_timeline: keep`` the procedure row, its order,
patient and timeline stay (a compact record), only the bulky rows go.

Each purged procedure gets an audit Procedure Record with action D (PS3.15 A.5.3.11) in the transaction
that deletes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, and_, delete, exists, func, not_, or_, select

from broker.audit.events import procedure_record
from broker.audit.trail import broker_participant, record_many
from broker.domain.procedure_states import ProcedureState
from broker.domain.states import FINAL
from broker.outbox.outbox import MPPS_FORWARD, OUTBOX, RIS_STATUS, STGCMT_REQUEST, UPS_EVENT
from broker.retention import export
from broker.retention.policy import RetentionPolicy
from broker.retention.stale_steps import RETENTION_SOURCE
from broker.store.tables import (
    COMMITMENT_ITEMS,
    COMMITMENT_REQUESTS,
    IAN_NOTIFICATIONS,
    INSTANCE_AVAILABILITY,
    MPPS,
    ORDERS,
    PATIENTS,
    PROCEDURE_TRANSITIONS,
    PROCEDURES,
    STEP_TRANSITIONS,
    STEPS,
    UPS_SUBSCRIPTIONS,
    UPS_WORKITEMS,
)

log = structlog.get_logger(__name__)


FINISHED = (ProcedureState.COMPLETED, ProcedureState.DISCONTINUED, ProcedureState.CANCELED,
            ProcedureState.IMAGES_AVAILABLE, ProcedureState.ARCHIVED)
"""Procedure states after which nothing is expected (COMMIT FAILED waits for a person)."""


@dataclass
class ProcedureCounts:
    purged: int = 0
    held: int = 0
    steps: int = 0
    exported: int = 0
    orders: int = 0
    patients: int = 0


def _candidates(before: datetime, keep_timeline: bool) -> Any:
    """Finished procedures unchanged since ``before`` whose steps are all final and unchanged too."""
    busy_step = exists().where(STEPS.c.procedure_fk == PROCEDURES.c.id,
                               or_(STEPS.c.sps_status.not_in(sorted(FINAL)), STEPS.c.updated_at >= before))
    conditions = [PROCEDURES.c.state.in_([str(s) for s in FINISHED]), PROCEDURES.c.updated_at < before,
                  not_(busy_step)]
    if keep_timeline:  # a kept procedure without steps has been purged already
        conditions.append(exists().where(STEPS.c.procedure_fk == PROCEDURES.c.id))
    return conditions


def _held(db: Connection, procedure_pks: Sequence[int]) -> set[int]:
    """The procedures among ``procedure_pks`` that something still needs (see the module docstring)."""
    held: set[int] = set()
    # The events not done are few (the relay works them off in seconds; failed ones wait for a person):
    # read them once per batch and resolve what each one concerns.
    refs: dict[str, set[str]] = {RIS_STATUS: set(), MPPS_FORWARD: set(), STGCMT_REQUEST: set(), UPS_EVENT: set()}
    for kind, payload in db.execute(select(OUTBOX.c.kind, OUTBOX.c.payload).where(OUTBOX.c.status != "done")):
        if kind == RIS_STATUS:
            refs[kind].add(str(payload.get("procedure_pk", "")))
        elif kind == MPPS_FORWARD:
            refs[kind].add(str(payload.get("sop_instance_uid", "")))
        elif kind == STGCMT_REQUEST:
            refs[kind].add(str(payload.get("transaction_uid", "")))
        elif kind == UPS_EVENT:
            refs[kind].add(str(payload.get("uid", "")))
    wanted = set(procedure_pks)
    held |= {int(pk) for pk in refs[RIS_STATUS] if pk.isdigit() and int(pk) in wanted}
    if refs[MPPS_FORWARD]:
        held |= set(db.execute(select(MPPS.c.procedure_fk).where(
            MPPS.c.sop_instance_uid.in_(sorted(refs[MPPS_FORWARD])), MPPS.c.procedure_fk.in_(procedure_pks))).scalars())
    if refs[STGCMT_REQUEST]:
        held |= set(db.execute(select(COMMITMENT_REQUESTS.c.procedure_fk).where(
            COMMITMENT_REQUESTS.c.transaction_uid.in_(sorted(refs[STGCMT_REQUEST])),
            COMMITMENT_REQUESTS.c.procedure_fk.in_(procedure_pks))).scalars())
    if refs[UPS_EVENT]:
        held |= set(db.execute(select(STEPS.c.procedure_fk).where(
            STEPS.c.ups_instance_uid.in_(sorted(refs[UPS_EVENT])), STEPS.c.procedure_fk.in_(procedure_pks))).scalars())
    held |= set(db.execute(select(COMMITMENT_REQUESTS.c.procedure_fk).where(
        COMMITMENT_REQUESTS.c.procedure_fk.in_(procedure_pks), COMMITMENT_REQUESTS.c.status == "PENDING")).scalars())
    held |= set(db.execute(select(STEPS.c.procedure_fk).join(
        UPS_SUBSCRIPTIONS, UPS_SUBSCRIPTIONS.c.workitem_uid == STEPS.c.ups_instance_uid).where(
        STEPS.c.procedure_fk.in_(procedure_pks), UPS_SUBSCRIPTIONS.c.deletion_lock.is_(True))).scalars())
    return held


def purge_procedures(engine: Engine, policy: RetentionPolicy, now: datetime, *, dry_run: bool, ae_title: str,
                     audit: bool) -> ProcedureCounts:
    """Purge (or count, ``dry_run``) the finished procedures past their retention, a batch per transaction."""
    counts = ProcedureCounts()
    if policy.procedures_before is None:
        return counts
    conditions = _candidates(policy.procedures_before, policy.timeline == "keep")
    broker = broker_participant(ae_title) if audit and not dry_run else None
    last_id = 0
    while True:
        with engine.begin() as db:
            pks = list(db.execute(select(PROCEDURES.c.id).where(*conditions, PROCEDURES.c.id > last_id)
                                  .order_by(PROCEDURES.c.id).limit(policy.batch_size)).scalars())
            if not pks:
                return counts
            held = _held(db, pks)
            chosen = [pk for pk in pks if pk not in held]
            counts.held += len(held)
            if chosen and dry_run:
                counts.purged += len(chosen)
                counts.steps += db.execute(select(func.count()).select_from(STEPS)
                                           .where(STEPS.c.procedure_fk.in_(chosen))).scalar_one()
                counts.exported += len(chosen) if policy.timeline == "export" else 0
            elif chosen:
                _purge(db, chosen, policy, now, counts, broker)
        last_id = pks[-1]


def _purge(db: Connection, pks: list[int], policy: RetentionPolicy, now: datetime, counts: ProcedureCounts,
           broker: Any) -> None:
    subjects = db.execute(
        select(PROCEDURES.c.id, PROCEDURES.c.order_fk, PROCEDURES.c.accession_number, PROCEDURES.c.study_instance_uid,
               PATIENTS.c.patient_id, PATIENTS.c.issuer, ORDERS.c.patient_fk)
        .join(ORDERS, ORDERS.c.id == PROCEDURES.c.order_fk).join(PATIENTS, PATIENTS.c.id == ORDERS.c.patient_fk)
        .where(PROCEDURES.c.id.in_(pks))).all()
    if policy.timeline == "export":
        documents = export.summaries(db, pks, now)
        export.write_lines(export.export_path(policy.export_dir, now), documents)
        counts.exported += len(documents)
    steps = db.execute(select(STEPS.c.id, STEPS.c.ups_instance_uid, STEPS.c.patient_fk)
                       .where(STEPS.c.procedure_fk.in_(pks))).all()
    step_pks = [s.id for s in steps]
    uids = [s.ups_instance_uid for s in steps if s.ups_instance_uid]
    requests = select(COMMITMENT_REQUESTS.c.id).where(COMMITMENT_REQUESTS.c.procedure_fk.in_(pks)).scalar_subquery()
    db.execute(delete(COMMITMENT_ITEMS).where(COMMITMENT_ITEMS.c.request_fk.in_(requests)))
    db.execute(delete(COMMITMENT_REQUESTS).where(COMMITMENT_REQUESTS.c.procedure_fk.in_(pks)))
    db.execute(delete(INSTANCE_AVAILABILITY).where(INSTANCE_AVAILABILITY.c.procedure_fk.in_(pks)))
    db.execute(delete(IAN_NOTIFICATIONS).where(IAN_NOTIFICATIONS.c.procedure_fk.in_(pks)))
    db.execute(delete(MPPS).where(or_(MPPS.c.procedure_fk.in_(pks), MPPS.c.step_fk.in_(step_pks))))
    if uids:
        db.execute(delete(UPS_SUBSCRIPTIONS).where(UPS_SUBSCRIPTIONS.c.workitem_uid.in_(uids)))
    db.execute(delete(UPS_WORKITEMS).where(UPS_WORKITEMS.c.step_fk.in_(step_pks)))
    db.execute(delete(STEP_TRANSITIONS).where(STEP_TRANSITIONS.c.step_fk.in_(step_pks)))
    counts.steps += db.execute(delete(STEPS).where(STEPS.c.id.in_(step_pks))).rowcount or 0
    counts.purged += len(pks)
    if policy.timeline != "keep":
        db.execute(delete(PROCEDURE_TRANSITIONS).where(PROCEDURE_TRANSITIONS.c.procedure_fk.in_(pks)))
        db.execute(delete(PROCEDURES).where(PROCEDURES.c.id.in_(pks)))
        counts.orders += _purge_orders(db, sorted({s.order_fk for s in subjects}))
        patient_pks = {s.patient_fk for s in subjects} | {s.patient_fk for s in steps}
        assert policy.procedures_before is not None
        counts.patients += _purge_patients(db, sorted(patient_pks), policy.procedures_before)
    if broker is not None:
        record_many(db, [(procedure_record("D", RETENTION_SOURCE, broker,
                                           patient_id=f"{s.patient_id}^^^{s.issuer}" if s.issuer else s.patient_id,
                                           study_uid=s.study_instance_uid, accession_number=s.accession_number,
                                           description=f"retention: purged, timeline {policy.timeline}"), now)
                         for s in subjects])
    log.info("retention.procedures_purged", count=len(pks), steps=len(step_pks), first_procedure_pk=pks[0],
             last_procedure_pk=pks[-1])


def _purge_orders(db: Connection, order_pks: list[int]) -> int:
    """Delete the orders among ``order_pks`` that have no procedure left."""
    if not order_pks:
        return 0
    left = exists().where(PROCEDURES.c.order_fk == ORDERS.c.id)
    return db.execute(delete(ORDERS).where(ORDERS.c.id.in_(order_pks), not_(left))).rowcount or 0


def _purge_patients(db: Connection, patient_pks: list[int], before: datetime) -> int:
    """Delete the patients among ``patient_pks`` that nothing names any more (see the module docstring)."""
    if not patient_pks:
        return 0
    other = PATIENTS.alias("other")
    named = or_(exists().where(ORDERS.c.patient_fk == PATIENTS.c.id),
                exists().where(STEPS.c.patient_fk == PATIENTS.c.id),
                exists().where(other.c.merged_into_id == PATIENTS.c.id))
    return db.execute(delete(PATIENTS).where(
        and_(PATIENTS.c.id.in_(patient_pks), PATIENTS.c.merged_into_id.is_(None), PATIENTS.c.updated_at < before,
             not_(named)))).rowcount or 0
