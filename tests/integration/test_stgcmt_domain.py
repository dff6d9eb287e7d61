"""Storage Commitment requests, results and the timeout (spec section 6) on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine

from broker.mapping.rules import MappingSet
from broker.mpps.service import MppsService
from broker.stgcmt.service import CommitmentService
from broker.workflow.context import WorkflowConfig
from broker.workflow.outcome import INVALID_ARGUMENT_VALUE, SUCCESS
from tests.events_support import (
    CT_IMAGE,
    commitment,
    mpps_create,
    mpps_final,
    outbox,
    procedure_state,
    schedule,
    timeline,
)

pytestmark = pytest.mark.integration
CONFIG = WorkflowConfig(ris_transitions=frozenset({"STARTED", "COMPLETED"}), archive_ae="ARCHIVE",
                        stgcmt_timeout=60)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 9, 0, 0)

    def __call__(self) -> datetime:
        return self.now


def completed(engine: Engine, mappings: MappingSet, clock: Clock) -> tuple[int, str, list[str]]:
    """A procedure whose MPPS completed with two images: (procedure pk, transaction UID, images)."""
    order = schedule(engine, mappings)
    mpps = MppsService(engine, CONFIG, clock=clock)
    uid, images = generate_uid(), [generate_uid(), generate_uid()]
    mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    mpps.update(uid, mpps_final("COMPLETED", images), "CT01")
    [(request, _)] = commitment(engine)
    return order.procedure_pk, request.transaction_uid, images


def test_all_committed_archives(engine: Engine, mappings: MappingSet) -> None:
    clock = Clock()
    procedure_pk, transaction_uid, images = completed(engine, mappings, clock)
    service = CommitmentService(engine, CONFIG, clock=clock)
    outcome = service.record_result(transaction_uid, [(CT_IMAGE, i) for i in images], [])
    assert outcome.status == SUCCESS
    [(request, items)] = commitment(engine)
    assert request.status == "COMMITTED" and all(i.committed for i in items)
    assert procedure_state(engine, procedure_pk) == "ARCHIVED"
    assert timeline(engine, procedure_pk)[-1] == ("COMPLETED", "ARCHIVED", "stgcmt")
    # a repeated report changes nothing
    assert service.record_result(transaction_uid, [], [(CT_IMAGE, images[0], 0x0110)]).ok
    assert procedure_state(engine, procedure_pk) == "ARCHIVED"


def test_a_failed_instance_is_commit_failed_with_its_reason(engine: Engine, mappings: MappingSet) -> None:
    clock = Clock()
    procedure_pk, transaction_uid, images = completed(engine, mappings, clock)
    service = CommitmentService(engine, CONFIG, clock=clock)
    assert service.record_result(transaction_uid, [(CT_IMAGE, images[0])], [(CT_IMAGE, images[1], 0x0112)]).ok
    [(request, items)] = commitment(engine)
    assert request.status == "FAILED" and "1 instance" in request.reason
    assert {i.sop_instance_uid: (i.committed, i.failure_reason) for i in items} == {
        images[0]: (True, None), images[1]: (False, 0x0112)}
    assert procedure_state(engine, procedure_pk) == "COMMIT FAILED"


def test_unknown_transaction_is_a_failure_and_changes_nothing(engine: Engine, mappings: MappingSet) -> None:
    clock = Clock()
    procedure_pk, _, _ = completed(engine, mappings, clock)
    outcome = CommitmentService(engine, CONFIG, clock=clock).record_result(generate_uid(), [], [])
    assert outcome.status == INVALID_ARGUMENT_VALUE
    assert procedure_state(engine, procedure_pk) == "COMPLETED"


def test_timeout_marks_failed_and_a_late_success_still_archives(engine: Engine, mappings: MappingSet) -> None:
    clock = Clock()
    procedure_pk, transaction_uid, images = completed(engine, mappings, clock)
    service = CommitmentService(engine, CONFIG, clock=clock)
    clock.now += timedelta(seconds=30)
    assert service.sweep_timeouts() == 0
    clock.now += timedelta(seconds=31)
    assert service.sweep_timeouts() == 1
    [(request, _)] = commitment(engine)
    assert (request.status, request.reason) == ("FAILED", "no answer within 60 s")
    assert procedure_state(engine, procedure_pk) == "COMMIT FAILED"
    assert service.sweep_timeouts() == 0
    assert service.record_result(transaction_uid, [(CT_IMAGE, i) for i in images], []).ok
    assert procedure_state(engine, procedure_pk) == "ARCHIVED"
    assert [t[1] for t in timeline(engine, procedure_pk)][-2:] == ["COMMIT FAILED", "ARCHIVED"]


def test_no_archive_configured_no_request(engine: Engine, mappings: MappingSet) -> None:
    order = schedule(engine, mappings)
    mpps = MppsService(engine, WorkflowConfig())
    uid = generate_uid()
    mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    mpps.update(uid, mpps_final(), "CT01")
    assert commitment(engine) == [] and outbox(engine, "stgcmt.request") == []
