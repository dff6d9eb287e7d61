"""Steps that never started: DISCONTINUED once their scheduled start plus the grace has passed.

A step left SCHEDULED (or ARRIVED, READY) after its day would stay on the worklist and as a SCHEDULED
UPS workitem for ever. It is discontinued through the domain path of an HL7 DC order
(:meth:`WorklistService.set_step_status`, as ``change_order_status`` does step by step): the step's
transition, its procedure's transition to DISCONTINUED with the RIS status message (ORC-5 ``DC``) when
the RIS is told of DISCONTINUED, and the UPS State Report CANCELED to the workitem's subscribers (PS3.4
CC: a UPS has no DISCONTINUED; a step status DISCONTINUED shows as CANCELED). The cause names the rule,
so the timeline says why: "retention: not started by 2026-11-23 09:30 + 24 h".

A step without a scheduled start counts from when it was created.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, and_, func, or_, select

from broker.audit.events import Source, procedure_record
from broker.audit.trail import broker_participant, record_many
from broker.domain.auditing import step_subject
from broker.domain.procedure_tracker import ProcedureTracker
from broker.domain.records import Cause
from broker.domain.services import WorklistService
from broker.domain.states import NOT_STARTED, StepStatus
from broker.retention.policy import RetentionPolicy
from broker.store.tables import ScheduledStep, table_of

log = structlog.get_logger(__name__)

STEPS = table_of(ScheduledStep)
RETENTION_SOURCE = Source("broker retention", channel="broker")
"""The requestor the audit records of retention name: the broker itself, by its own rule."""


def _stale(before: datetime) -> Any:
    return and_(STEPS.c.sps_status.in_(sorted(NOT_STARTED)), or_(
        STEPS.c.scheduled_start < before,
        and_(STEPS.c.scheduled_start.is_(None), STEPS.c.created_at < before)))


def count_stale(engine: Engine, policy: RetentionPolicy) -> int:
    """How many steps a pass would discontinue (the dry run)."""
    if policy.stale_steps_before is None:
        return 0
    with engine.connect() as db:
        return int(db.execute(select(func.count()).select_from(STEPS)
                              .where(_stale(policy.stale_steps_before))).scalar_one())


def cause_of(step: Any, grace_hours: float) -> Cause:
    """The timeline's cause: when the step should have started, and the grace it had."""
    start = step.scheduled_start or step.created_at
    grace = f"{grace_hours:g}"
    return Cause(f"retention: not started by {start:%Y-%m-%d %H:%M} + {grace} h", event_kind="retention",
                 event_ref=str(step.sps_id)[:64])


def discontinue_stale(engine: Engine, policy: RetentionPolicy, now: datetime, *, ris_transitions: frozenset[str],
                      ae_title: str, audit: bool) -> int:
    """Discontinue every stale step, ``policy.batch_size`` per transaction; returns how many.

    ``ris_transitions``: the procedure states reported to the RIS (empty when no RIS is configured);
    ``audit``: each step gets a Procedure Record (U, "retention: DISCONTINUED").
    """
    if policy.stale_steps_before is None:
        return 0
    broker = broker_participant(ae_title) if audit else None
    done = 0
    last_id = 0
    while True:
        with engine.begin() as db:
            steps = list(db.execute(select(STEPS).where(_stale(policy.stale_steps_before), STEPS.c.id > last_id)
                                    .order_by(STEPS.c.id).limit(policy.batch_size)))
            if not steps:
                return done
            changed = _discontinue(db, steps, policy, now, ris_transitions)
            done += len(changed)
            if broker is not None and changed:
                record_many(db, [(procedure_record("U", RETENTION_SOURCE, broker, patient_id=str(s.patient),
                                                   study_uid=s.study_uid, accession_number=s.accession_number,
                                                   step_id=s.step_id, description="retention: DISCONTINUED"), now)
                                 for s in map(step_subject, changed)])
        last_id = steps[-1].id


def _discontinue(db: Connection, steps: list[Any], policy: RetentionPolicy, now: datetime,
                 ris_transitions: frozenset[str]) -> list[Any]:
    clock: Callable[[], datetime] = lambda: now  # noqa: E731 - the pass's one moment
    service = WorklistService(db, clock, ProcedureTracker(ris_transitions, clock))
    changed = []
    for step in steps:
        # read again under a row lock: a modality may have started it since the batch was chosen
        status = db.execute(select(STEPS.c.sps_status).where(STEPS.c.id == step.id).with_for_update()).scalar()
        if status not in NOT_STARTED:
            continue
        if service.set_step_status(step.id, StepStatus.DISCONTINUED, cause_of(step, policy.grace_hours)):
            changed.append(step)
    log.info("retention.steps_discontinued", count=len(changed), first_step_pk=steps[0].id, last_step_pk=steps[-1].id)
    return changed
