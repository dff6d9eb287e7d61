"""End to end through a real TCP connection: every sample of ``samples/hl7/``, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from broker.hl7.mllp_client import MLLPClient
from broker.store.tables import InboundMessage, Patient
from tests.conftest import sample
from tests.hl7_support import (
    ack_of,
    code_item,
    err_fields,
    item_value,
    msa_code,
    sps_value,
    steps,
    with_control_id,
)

pytestmark = pytest.mark.integration


def send(port: int, *messages: bytes) -> list[bytes]:
    with MLLPClient("127.0.0.1", port) as client:
        return [client.send(m) for m in messages]


def test_new_order_becomes_one_scheduled_step(listener: int, sessions: sessionmaker[Session]) -> None:
    [reply] = send(listener, sample("orm_o01_new.hl7"))
    assert msa_code(reply) == "AA"
    ack = ack_of(reply)
    assert ack.value(ack.first("MSA"), 2) == "RIS000101"
    assert ack.value(ack.msh, 18) == "8859/1"  # answered in the message's own character set
    [step] = steps(sessions)
    assert step.sps_status == "SCHEDULED" and sps_value(step, "ScheduledProcedureStepStatus") == "SCHEDULED"
    assert item_value(step, "PatientID") == "MRN4711"
    assert item_value(step, "IssuerOfPatientID") == "GENHOSP"
    assert item_value(step, "PatientName") == "MÜLLER^ERIKA^A^FRAU"  # XPN reordered to PN
    assert item_value(step, "PatientBirthDate") == "19620412"
    assert item_value(step, "PatientSex") == "F"
    assert item_value(step, "AccessionNumber") == "ACC77001"
    assert item_value(step, "RequestedProcedureID") == "RP77001"
    assert item_value(step, "StudyInstanceUID") == "1.2.826.0.1.3680043.10.543.77001"  # from ZDS-1
    assert item_value(step, "RequestedProcedurePriority") == "ROUTINE"
    assert item_value(step, "ReferringPhysicianName") == ""  # PV1-8 is empty (HOUSE is PV1-7, attending)
    assert item_value(step, "RequestingPhysician") == "HOUSE^GREGORY^^DR"
    assert item_value(step, "PlacerOrderNumberImagingServiceRequest") == "PO-77001"
    assert item_value(step, "FillerOrderNumberImagingServiceRequest") == "FO-77001"
    assert item_value(step, "AdmissionID") == "V77001"
    assert item_value(step, "SpecificCharacterSet") == "ISO_IR 100"
    assert sps_value(step, "ScheduledProcedureStepID") == "SPS77001"
    assert sps_value(step, "Modality") == "CT"
    assert sps_value(step, "ScheduledStationAETitle") == "CT01"  # v2.3.1: assigned by the sender's rule
    assert sps_value(step, "ScheduledProcedureStepStartDate") == "20261123"
    assert sps_value(step, "ScheduledProcedureStepStartTime") == "093000"
    assert sps_value(step, "ScheduledProcedureStepDescription") == "CT ABDOMEN WITH CONTRAST"
    assert code_item(step, "ScheduledProtocolCodeSequence") == {
        "CodeValue": "CTABD", "CodingSchemeDesignator": "LOCAL", "CodeMeaning": "CT ABDOMEN WITH CONTRAST"}
    # the indexed columns agree with the item
    assert (step.scheduled_station_ae_title, step.modality, step.accession_number) == ("CT01", "CT", "ACC77001")
    assert step.scheduled_start is not None and step.scheduled_start.isoformat() == "2026-11-23T09:30:00"
    assert step.patient_name_norm == "MÜLLER^ERIKA^A^FRAU".upper()


def test_reschedule_moves_the_step_and_cancel_hides_it(listener: int, sessions: sessionmaker[Session]) -> None:
    replies = send(listener, sample("orm_o01_new.hl7"), sample("orm_o01_reschedule.hl7"))
    assert [msa_code(r) for r in replies] == ["AA", "AA"]
    [step] = steps(sessions)
    assert (step.sps_start_date, step.sps_start_time) == ("20261123", "141500")
    assert sps_value(step, "ScheduledProcedureStepStartTime") == "141500"
    assert step.sps_status == "SCHEDULED"
    [reply] = send(listener, sample("orm_o01_cancel.hl7"))
    assert msa_code(reply) == "AA"
    [step] = steps(sessions)
    assert step.sps_status == "CANCELED"  # kept, hidden from the worklist
    assert sps_value(step, "ScheduledProcedureStepStatus") == "CANCELED"


def test_repeat_of_same_control_id_gets_the_original_ack_and_changes_nothing(
        listener: int, sessions: sessionmaker[Session]) -> None:
    first, repeat = send(listener, sample("orm_o01_new.hl7"), sample("orm_o01_new.hl7"))
    assert repeat == first
    assert len(steps(sessions)) == 1
    with sessions() as session:
        statuses = session.scalars(select(InboundMessage.status).order_by(InboundMessage.id)).all()
    assert statuses == ["accepted", "duplicate"]


def test_same_order_again_under_new_control_id_is_a_duplicate_key(
        listener: int, sessions: sessionmaker[Session]) -> None:
    again = with_control_id(sample("orm_o01_new.hl7"), "RIS000999")
    first, second = send(listener, sample("orm_o01_new.hl7"), again)
    assert msa_code(first) == "AA"
    assert msa_code(second) == "AE"
    assert [(loc, code) for loc, code, _ in err_fields(second)] == [("ORC-2", "205")]
    assert len(steps(sessions)) == 1


def test_omi_with_two_ipc_segments_gives_two_steps_of_one_procedure(
        listener: int, sessions: sessionmaker[Session]) -> None:
    [reply] = send(listener, sample("omi_o23_two_steps.hl7"))
    ack = ack_of(reply, "utf-8")
    # MSH-15 AL / MSH-16 NE: enhanced mode, one accept acknowledgement, sent after the commit
    assert ack.value(ack.first("MSA"), 1) == "CA"
    assert ack.value(ack.msh, 18) == "UNICODE UTF-8"
    first, second = steps(sessions)
    assert [sps_value(s, "ScheduledProcedureStepID") for s in (first, second)] == ["SPS501A", "SPS501B"]
    assert first.procedure_fk == second.procedure_fk
    for step in (first, second):
        assert item_value(step, "PatientName") == "NGUYỄN^LINH^^MS"
        assert item_value(step, "SpecificCharacterSet") == "ISO_IR 192"
        assert item_value(step, "StudyInstanceUID") == "1.2.826.0.1.3680043.10.543.501"
        assert item_value(step, "AccessionNumber") == "ACC501"
        assert item_value(step, "RequestedProcedurePriority") == "STAT"
        assert sps_value(step, "ScheduledStationAETitle") == "MR2"  # IPC-9
        assert sps_value(step, "ScheduledStationName") == "MR_ROOM_2"
        assert sps_value(step, "ScheduledProcedureStepLocation") == "MRI SUITE B"
        assert sps_value(step, "Modality") == "MR"
        assert (step.sps_start_date, step.sps_start_time) == ("20261123", "110000")  # TQ1-7
    assert code_item(second, "ScheduledProtocolCodeSequence")["CodeMeaning"] == "T2 COR"
    other = first.item["00101002"]["Value"][0]
    assert other["00100020"]["Value"] == ["999-88-7777"] and other["00100021"]["Value"] == ["SSA"]


def test_patient_update_shows_in_open_items(listener: int, sessions: sessionmaker[Session]) -> None:
    replies = send(listener, sample("orm_o01_new.hl7"), sample("adt_a08_update.hl7"))
    assert [msa_code(r) for r in replies] == ["AA", "AA"]
    [step] = steps(sessions)
    assert item_value(step, "PatientName") == "MÜLLER-SCHMIDT^ERIKA^A^FRAU"
    assert step.patient_name == "MÜLLER-SCHMIDT^ERIKA^A^FRAU"


def test_update_does_not_touch_finished_items(listener: int, sessions: sessionmaker[Session]) -> None:
    send(listener, sample("orm_o01_new.hl7"), sample("orm_o01_cancel.hl7"), sample("adt_a08_update.hl7"))
    [step] = steps(sessions)
    assert item_value(step, "PatientName") == "MÜLLER^ERIKA^A^FRAU"


def test_merge_moves_items_to_the_surviving_patient(listener: int, sessions: sessionmaker[Session]) -> None:
    replies = send(listener, sample("orm_o01_new.hl7"), sample("adt_a40_merge.hl7"))
    assert [msa_code(r) for r in replies] == ["AA", "AA"]
    [step] = steps(sessions)
    assert item_value(step, "PatientID") == "MRN1000"
    assert step.patient_id == "MRN1000"
    with sessions() as session:
        prior = session.scalars(select(Patient).where(Patient.patient_id == "MRN4711")).one()
        surviving = session.scalars(select(Patient).where(Patient.patient_id == "MRN1000")).one()
    assert prior.merged_into_id == surviving.id
    assert step.patient_fk == surviving.id
    # an order that still names the old ID lands on the surviving patient
    later = with_control_id(sample("orm_o01_new.hl7"), "RIS000555").replace(b"O-77001", b"O-77555") \
        .replace(b"SPS77001", b"SPS77555").replace(b"ACC77001", b"ACC77555").replace(b".77001^", b".77555^")
    [reply] = send(listener, later)
    assert msa_code(reply) == "AA"
    assert [s.patient_id for s in steps(sessions)] == ["MRN1000", "MRN1000"]


def test_bad_fields_get_one_err_per_problem_and_store_nothing(
        listener: int, sessions: sessionmaker[Session]) -> None:
    [reply] = send(listener, sample("orm_o01_bad_fields.hl7"))
    assert msa_code(reply) == "AE"
    found = {(loc, code) for loc, code, _ in err_fields(reply)}
    assert ("PID-7", "102") in found  # 1971XXXX is no date
    assert ("ORC-7", "102") in found  # 2026-11-23T09:30 is no HL7 timestamp
    assert ("OBR-18", "101") in found  # no accession number
    assert steps(sessions) == []
    with sessions() as session:
        row = session.scalars(select(InboundMessage)).one()
        assert session.scalars(select(Patient)).all() == []
    assert row.status == "error" and row.ack == reply and b"MRN4712" in row.raw
