"""MPPS N-CREATE / N-SET rules and effects (spec section 4, PS3.4 F.7.2) on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Engine

from broker.mapping.rules import MappingSet
from broker.mpps.service import MppsService
from broker.store.tables import InstanceAvailability, StepTransition
from broker.workflow.context import WorkflowConfig
from broker.workflow.outcome import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    NO_SUCH_ATTRIBUTE,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    SUCCESS,
)
from tests.events_support import (
    commitment,
    mpps_create,
    mpps_final,
    mpps_row,
    outbox,
    procedure_state,
    rows,
    schedule,
    step_status,
    timeline,
)

pytestmark = pytest.mark.integration
CONFIG = WorkflowConfig(ris_transitions=frozenset({"STARTED", "COMPLETED", "DISCONTINUED"}), archive_ae="ARCHIVE",
                        forward_aes=("MPPSFWD",))


@pytest.fixture
def service(engine: Engine) -> MppsService:
    return MppsService(engine, CONFIG)


def test_create_links_the_step_and_starts_it(engine: Engine, mappings: MappingSet, service: MppsService) -> None:
    order = schedule(engine, mappings)
    uid = generate_uid()
    outcome = service.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    assert outcome.status == SUCCESS
    row = mpps_row(engine, uid)
    assert (row.status, row.step_fk, row.procedure_fk, row.unscheduled) == ("IN PROGRESS", order.step_pk,
                                                                           order.procedure_pk, False)
    assert step_status(engine, order.step_pk) == "STARTED"
    assert procedure_state(engine, order.procedure_pk) == "STARTED"
    assert timeline(engine, order.procedure_pk) == [("SCHEDULED", "STARTED", "mpps")]
    [ris] = outbox(engine, "ris.status")
    assert (ris.payload["order_status"], ris.ordering_key) == ("IP", f"order:{order.order_pk}")
    [forward] = outbox(engine, "mpps.forward")
    assert forward.payload["operation"] == "N-CREATE" and forward.ordering_key == f"mpps:MPPSFWD:{uid}"
    step_causes = [r.cause for r in rows(engine, StepTransition, step_fk=order.step_pk)]
    assert step_causes[-1] == f"MPPS {uid} IN PROGRESS"


def test_duplicate_create_is_0111(engine: Engine, mappings: MappingSet, service: MppsService) -> None:
    order = schedule(engine, mappings)
    uid = generate_uid()
    assert service.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01").ok
    outcome = service.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    assert outcome.status == DUPLICATE_SOP_INSTANCE
    assert len(outbox(engine, "mpps.forward")) == 1  # the refused request queued nothing


@pytest.mark.parametrize("status", ["COMPLETED", "DISCONTINUED", "STARTED"])
def test_create_not_in_progress_is_0106(engine: Engine, service: MppsService, status: str) -> None:
    outcome = service.create(generate_uid(), mpps_create("1.2.3", "S1", status=status), "CT01")
    assert outcome.status == INVALID_ATTRIBUTE_VALUE
    assert outcome.offending == (0x00400252,)
    assert mpps_row(engine, "1.2.3") is None and outbox(engine) == []


def test_missing_type_1_attributes_are_0120_with_their_tags(engine: Engine, service: MppsService) -> None:
    dataset = mpps_create("1.2.3", "S1")
    del dataset.PerformedStationAETitle
    del dataset.Modality
    outcome = service.create(generate_uid(), dataset, "CT01")
    assert outcome.status == MISSING_ATTRIBUTE
    assert set(outcome.offending) == {0x00400241, 0x00080060}
    assert "Modality" in (outcome.error_comment or "")


def test_empty_type_1_attribute_is_0121(engine: Engine, service: MppsService) -> None:
    dataset = mpps_create("1.2.3", "S1")
    dataset.PerformedProcedureStepID = ""
    assert service.create(generate_uid(), dataset, "CT01").status == MISSING_ATTRIBUTE_VALUE


def test_no_matching_step_is_kept_unscheduled(engine: Engine, mappings: MappingSet, service: MppsService) -> None:
    order = schedule(engine, mappings)
    uid = generate_uid()
    assert service.create(uid, mpps_create("1.2.999", "NOPE"), "CT01").ok
    row = mpps_row(engine, uid)
    assert (row.unscheduled, row.step_fk, row.procedure_fk, row.study_instance_uid) == (True, None, None, "1.2.999")
    assert step_status(engine, order.step_pk) == "SCHEDULED"
    assert outbox(engine, "ris.status") == []
    # completing it keeps it unscheduled and asks for no commitment (no procedure to archive)
    assert service.update(uid, mpps_final(), "CT01").ok
    assert commitment(engine) == []


def test_completed_completes_step_and_procedure_and_requests_commitment(
        engine: Engine, mappings: MappingSet, service: MppsService) -> None:
    order = schedule(engine, mappings)
    uid = generate_uid()
    images = [generate_uid(), generate_uid()]
    assert service.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01").ok
    assert service.update(uid, mpps_final("COMPLETED", images), "CT01").status == SUCCESS
    assert mpps_row(engine, uid).status == "COMPLETED"
    assert step_status(engine, order.step_pk) == "COMPLETED"
    assert timeline(engine, order.procedure_pk) == [("SCHEDULED", "STARTED", "mpps"), ("STARTED", "COMPLETED", "mpps")]
    assert [r.payload["order_status"] for r in outbox(engine, "ris.status")] == ["IP", "CM"]
    assert sorted(r.sop_instance_uid for r in rows(engine, InstanceAvailability)) == sorted(images)
    [(request, items)] = commitment(engine)
    assert request.status == "PENDING" and sorted(i.sop_instance_uid for i in items) == sorted(images)
    assert [r.payload["transaction_uid"] for r in outbox(engine, "stgcmt.request")] == [request.transaction_uid]
    assert [r.payload["operation"] for r in outbox(engine, "mpps.forward")] == ["N-CREATE", "N-SET"]


def test_discontinued(engine: Engine, mappings: MappingSet, service: MppsService) -> None:
    order = schedule(engine, mappings)
    uid = generate_uid()
    service.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    assert service.update(uid, mpps_final("DISCONTINUED"), "CT01").ok
    assert step_status(engine, order.step_pk) == "DISCONTINUED"
    assert procedure_state(engine, order.procedure_pk) == "DISCONTINUED"
    assert outbox(engine, "ris.status")[-1].payload["order_status"] == "DC"
    assert commitment(engine) == []


@pytest.mark.parametrize("final", ["COMPLETED", "DISCONTINUED"])
def test_set_after_final_is_0110_a710(engine: Engine, mappings: MappingSet, service: MppsService, final: str) -> None:
    order = schedule(engine, mappings)
    uid = generate_uid()
    service.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    service.update(uid, mpps_final(final), "CT01")
    before = len(outbox(engine))
    again = Dataset()
    again.PerformedProcedureStepDescription = "late"
    outcome = service.update(uid, again, "CT01")
    assert outcome.status == PROCESSING_FAILURE
    assert outcome.error_comment == "Performed Procedure Step Object may no longer be updated"
    assert outcome.error_id == 0xA710
    assert len(outbox(engine)) == before
    assert "PerformedProcedureStepDescription" not in str(mpps_row(engine, uid).dataset)


def test_set_on_unknown_instance_is_0112(engine: Engine, service: MppsService) -> None:
    assert service.update(generate_uid(), mpps_final(), "CT01").status == NO_SUCH_OBJECT_INSTANCE
    assert outbox(engine) == []


@pytest.mark.parametrize(("keyword", "value"), [
    ("PatientID", "OTHER"), ("PatientName", "DOE^JOHN"), ("PerformedProcedureStepStartDate", "20270101"),
    ("ScheduledStepAttributesSequence", []), ("Modality", "MR"),
])
def test_identity_change_is_0105(engine: Engine, mappings: MappingSet, service: MppsService, keyword: str,
                                 value: Any) -> None:
    order = schedule(engine, mappings)
    uid = generate_uid()
    service.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    change = Dataset()
    setattr(change, keyword, value)
    outcome = service.update(uid, change, "CT01")
    assert outcome.status == NO_SUCH_ATTRIBUTE
    assert len(outcome.offending) == 1
    assert mpps_row(engine, uid).status == "IN PROGRESS"


def test_repeating_an_identity_attribute_unchanged_is_accepted(engine: Engine, mappings: MappingSet,
                                                              service: MppsService) -> None:
    order = schedule(engine, mappings)
    uid = generate_uid()
    service.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    change = Dataset()
    change.PatientID = "MRN4711"
    change.PerformedProcedureStepDescription = "CT ABDOMEN"
    assert service.update(uid, change, "CT01").ok


def test_sequence_in_set_replaces_the_whole_sequence(engine: Engine, mappings: MappingSet,
                                                     service: MppsService) -> None:
    order = schedule(engine, mappings)
    uid = generate_uid()
    service.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    first = mpps_final("IN PROGRESS", [generate_uid(), generate_uid()])
    assert service.update(uid, first, "CT01").ok
    replacement = [generate_uid()]
    assert service.update(uid, mpps_final("IN PROGRESS", replacement), "CT01").ok
    stored = Dataset.from_json(mpps_row(engine, uid).dataset)
    [series] = stored.PerformedSeriesSequence
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedImageSequence] == replacement


@pytest.mark.parametrize("drop", ["PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime",
                                  "PerformedSeriesSequence"])
def test_completion_without_final_state_attributes_is_refused(engine: Engine, mappings: MappingSet,
                                                              service: MppsService, drop: str) -> None:
    order = schedule(engine, mappings)
    uid = generate_uid()
    service.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    final = mpps_final()
    delattr(final, drop)
    outcome = service.update(uid, final, "CT01")
    assert outcome.status == PROCESSING_FAILURE
    assert drop in (outcome.error_comment or "")
    assert mpps_row(engine, uid).status == "IN PROGRESS"
    assert step_status(engine, order.step_pk) == "STARTED"


def test_bad_status_in_set_is_0106(engine: Engine, mappings: MappingSet, service: MppsService) -> None:
    order = schedule(engine, mappings)
    uid = generate_uid()
    service.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    change = Dataset()
    change.PerformedProcedureStepStatus = "FINISHED"
    assert service.update(uid, change, "CT01").status == INVALID_ATTRIBUTE_VALUE


def test_no_ris_status_without_a_ris_and_none_for_hl7_changes(engine: Engine, mappings: MappingSet) -> None:
    order = schedule(engine, mappings)
    quiet = MppsService(engine, WorkflowConfig())
    uid = generate_uid()
    assert quiet.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01").ok
    assert outbox(engine) == []
    assert procedure_state(engine, order.procedure_pk) == "STARTED"


def test_hl7_status_changes_move_the_procedure_without_echo_to_the_ris(engine: Engine, mappings: MappingSet) -> None:
    from broker.intake.service import Intake
    from tests.conftest import sample

    order = schedule(engine, mappings)
    [ack] = Intake(engine, mappings).handle(sample("orm_o01_cancel.hl7"))
    assert b"MSA|AA" in ack
    assert timeline(engine, order.procedure_pk) == [("SCHEDULED", "CANCELED", "hl7")]
    assert outbox(engine) == []


def test_broker_procedure_prints_the_timeline(engine: Engine, database_url: str, mappings: MappingSet,
                                              service: MppsService) -> None:
    import json

    from tests.integration.test_cli import env_for, run_cli

    order = schedule(engine, mappings)
    uid = generate_uid()
    service.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    service.update(uid, mpps_final(), "CT01")
    env = env_for(database_url)
    human = run_cli("procedure", order.accession_number, env=env)
    assert human.returncode == 0, human.stderr
    assert "state COMPLETED" in human.stdout and f"MPPS {uid} COMPLETED" in human.stdout
    report = json.loads(run_cli("procedure", order.accession_number, "--json", env=env).stdout)
    assert [t["to"] for t in report["timeline"]] == ["STARTED", "COMPLETED"]
    assert run_cli("procedure", "NOSUCH", env=env).returncode == 1
