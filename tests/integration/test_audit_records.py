"""The audit records of changes (Order, Patient and Procedure Records, and the Security Alert of a replayed
message), on SQLite and PostgreSQL, each made by a real client: HL7 over MLLP to a real listener, HTTP
requests to the API, DICOM N-CREATE / N-SET / N-ACTION / N-EVENT-REPORT from pynetdicom to the broker's
DICOM server. Each test finds exactly the records expected (event, action, patient, accession and study,
who asked and from where) and no other; a change that is refused or rolled back leaves none.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    InstanceAvailabilityNotification,
    ModalityPerformedProcedureStep,
    StorageCommitmentPushModel,
)
from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import OperationalError

from broker.audit.stored import from_json
from broker.config import load_settings
from broker.dicom.workflow import build_workflow
from broker.hl7.mllp import MLLPServer, run_in_thread
from broker.hl7.mllp_client import MLLPClient
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.mpps.service import MppsService
from broker.store.tables import AuditRecord, MppsInstance, Order, ScheduledStep, table_of
from broker.web.app import create_app
from broker.workflow.context import WorkflowConfig
from broker.workflow.outcome import PROCESSING_FAILURE, SUCCESS
from tests.conftest import ROOT, sample
from tests.dicom_support import STGCMT_INSTANCE, dicom_server, free_port, report_dataset
from tests.events_support import CT_IMAGE, commitment, ian, mpps_create, mpps_final, schedule
from tests.hl7_support import with_control_id
from tests.integration.test_ups_scp import (
    CHANGE_STATE,
    action,
    change_state,
    create,
    n_set,
    progress,
    ups_scu,
    workitem,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NEW = sample("orm_o01_new.hl7")
PATIENT = "MRN4711^^^GENHOSP"
STUDY = "1.2.826.0.1.3680043.10.543.77001"
RIS = "EPICRIS^GENHOSP"
WRITE = "write-token-audit-records"
STEPS = table_of(ScheduledStep)
RECORDS = table_of(AuditRecord)


# --- reading the audit table ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rec:
    """One stored audit record, as these tests compare it."""

    event: str  # EventID code meaning: "Order Record", ...
    action: str
    user: str  # the requestor's UserID
    host: str  # the requestor's NetworkAccessPointID
    patients: tuple[str, ...] = ()
    orders: tuple[str, ...] = ()  # accession numbers
    studies: tuple[str, ...] = ()
    procedures: tuple[str, ...] = ()  # SPS IDs or UPS SOP Instance UIDs
    description: str = ""  # of the study / procedure objects (Procedure Record), or the outcome (alerts)
    alert: str = ""  # EventTypeCode meaning of a Security Alert


def recorded(engine: Engine, event: str | None = None) -> list[Rec]:
    """The audit records, oldest first (only those of ``event`` when given)."""
    with engine.connect() as db:
        documents = db.execute(select(RECORDS.c.event).order_by(RECORDS.c.id)).scalars().all()
    found = [_rec(from_json(document)) for document in documents]
    return [r for r in found if event is None or r.event == event]


def _rec(event: Any) -> Rec:
    def ids(kind: str) -> tuple[str, ...]:
        return tuple(o.object_id for o in event.objects if o.kind == kind)

    requestor = event.requestor
    descriptions = [o.description for o in event.objects if o.kind in ("study", "procedure") and o.description]
    return Rec(event.event_id[2], event.action, requestor.user_id if requestor else "",
               requestor.host if requestor else "", ids("patient"), ids("order"), ids("study"), ids("procedure"),
               descriptions[0] if descriptions else event.outcome_description,
               event.event_type[0][2] if event.event_type and event.event_id[2] == "Security Alert" else "")


# --- HL7 over MLLP --------------------------------------------------------------------------------------

@pytest.fixture
def hl7_port(engine: Engine, mappings: MappingSet) -> Iterator[int]:
    """A real MLLP listener whose intake records the audit trail."""
    server = MLLPServer(Intake(engine, mappings, audit=True, ae_title="BROKER"), host="127.0.0.1", port=0,
                        workers=4, idle_timeout=30)
    thread = run_in_thread(server)
    try:
        yield thread.port
    finally:
        thread.stop()


def send(port: int, *messages: bytes) -> list[str]:
    """Each message's MSA-1."""
    with MLLPClient("127.0.0.1", port) as client:
        replies = [client.send(m) for m in messages]
    return [reply.split(b"MSA|")[1][:2].decode() for reply in replies]


def with_second_order(raw: bytes) -> bytes:
    """``raw`` with its ORC group again under another placer order number: refused (AE 205, the filler order
    number exists) after the first group placed its order, in the same transaction."""
    group = raw[raw.index(b"\rORC|") + 1:]
    placer = group.split(b"|")[2].split(b"^")[0]
    return raw + group.replace(placer, placer + b"X")


def order_control(control: str, status: str, control_id: str) -> bytes:
    """The sample order with another ORC-1 / ORC-5 and MSH-10."""
    return with_control_id(NEW, control_id).replace(b"ORC|NW|", f"ORC|{control}|".encode()).replace(
        b"|FO-77001^RADRIS||SC||", f"|FO-77001^RADRIS||{status}||".encode())


def ris_record(event: str, action: str, **objects: Any) -> Rec:
    return Rec(event, action, RIS, "127.0.0.1", **objects)


def test_hl7_orders_are_order_records(engine: Engine, hl7_port: int) -> None:
    order = {"patients": (PATIENT,), "orders": ("ACC77001",), "studies": (STUDY,)}
    assert send(hl7_port, NEW) == ["AA"]
    assert recorded(engine) == [ris_record("Order Record", "C", **order)]
    assert send(hl7_port, sample("orm_o01_reschedule.hl7"), order_control("SC", "IP", "RIS-SC-1")) == ["AA", "AA"]
    assert send(hl7_port, sample("orm_o01_cancel.hl7")) == ["AA"]
    assert recorded(engine) == [ris_record("Order Record", "C", **order), ris_record("Order Record", "U", **order),
                                ris_record("Order Record", "U", **order), ris_record("Order Record", "D", **order)]
    # status only (ORC SC without a status that moves the steps): nothing changed, nothing recorded
    assert send(hl7_port, order_control("SC", "ZZ", "RIS-SC-2")) == ["AA"]
    assert len(recorded(engine)) == 4


def test_hl7_patient_updates_and_merges_are_patient_records(engine: Engine, hl7_port: int) -> None:
    assert send(hl7_port, NEW, sample("adt_a08_update.hl7"), sample("adt_a40_merge.hl7")) == ["AA"] * 3
    adt = "EPICADT^GENHOSP"
    assert recorded(engine, "Patient Record") == [
        Rec("Patient Record", "U", adt, "127.0.0.1", (PATIENT,)),
        Rec("Patient Record", "U", adt, "127.0.0.1", ("MRN1000^^^GENHOSP", PATIENT))]
    # an update of a patient the broker did not know creates it
    new_patient = with_control_id(sample("adt_a08_update.hl7"), "ADT-NEW").replace(b"MRN4711", b"MRN5555")
    assert send(hl7_port, new_patient) == ["AA"]
    assert recorded(engine)[-1] == Rec("Patient Record", "C", adt, "127.0.0.1", ("MRN5555^^^GENHOSP",))
    # ADT A10: the (surviving) patient's step of that day arrives, a Procedure Record of the step
    arrival = (b"MSH|^~\\&|EPICADT|GENHOSP|WLBROKER|RADIOLOGY|20261123090000||ADT^A10|ADT-A10|P|2.3.1\r"
               b"EVN|A10|20261123090000\rPID|1||MRN1000^^^GENHOSP^MR\rPV1|1|O\r")
    assert send(hl7_port, arrival) == ["AA"]
    assert recorded(engine)[-1] == Rec("Procedure Record", "U", adt, "127.0.0.1", ("MRN1000^^^GENHOSP",),
                                       ("ACC77001",), (STUDY,), ("SPS77001",), "SCHEDULED -> ARRIVED")


def test_a_refused_message_leaves_no_record(engine: Engine, hl7_port: int) -> None:
    # The first ORC places an order, the second is refused: the message is answered AE and the order
    # placed before the refusal is rolled back with its Order Record.
    assert send(hl7_port, with_second_order(with_control_id(NEW, "RIS-TWO"))) == ["AE"]
    with engine.connect() as db:
        assert db.execute(select(table_of(Order).c.id)).first() is None
    assert recorded(engine) == []


def test_records_commit_with_their_message_under_group_commit(engine: Engine, mappings: MappingSet) -> None:
    """Several senders at once (group commit: a savepoint per message): every accepted order has its
    Order Record, no refused one has any."""
    server = MLLPServer(Intake(engine, mappings, group_commit=True, audit=True), host="127.0.0.1", port=0,
                        workers=8, idle_timeout=30)
    thread = run_in_thread(server)
    outcomes: list[str] = []

    def sender(number: int) -> None:
        messages = []
        for index in range(4):
            key = f"{number}{index}"
            raw = with_control_id(NEW, f"GC{key}")
            for unique in (b"PO-77001", b"FO-77001", b"ACC77001", b"SPS77001", b"10.543.77001"):
                raw = raw.replace(unique, unique[:-5] + key.encode())
            messages.append(with_second_order(raw) if index % 2 else raw)
        outcomes.extend(send(thread.port, *messages))

    try:
        senders = [threading.Thread(target=sender, args=(n,)) for n in range(1, 7)]
        for each in senders:
            each.start()
        for each in senders:
            each.join(60)
    finally:
        thread.stop()
    assert sorted(outcomes) == ["AA"] * 12 + ["AE"] * 12
    with engine.connect() as db:
        accessions = sorted(db.execute(select(STEPS.c.accession_number)).scalars())
    assert len(accessions) == 12
    assert sorted(r.orders[0] for r in recorded(engine, "Order Record")) == accessions
    assert all(r.action == "C" for r in recorded(engine))


def test_a_repeated_control_id_with_other_content_is_a_security_alert(engine: Engine, hl7_port: int) -> None:
    assert send(hl7_port, NEW, NEW) == ["AA", "AA"]  # a retransmission: answered again, no alert
    assert [r.event for r in recorded(engine)] == ["Order Record"]
    other = NEW.replace(b"ACC77001", b"ACC66666")
    assert send(hl7_port, other) == ["AA"]  # answered with the original's ACK, changes nothing
    alerts = recorded(engine, "Security Alert")
    assert [(a.action, a.user, a.host, a.alert) for a in alerts] == [
        ("E", RIS, "127.0.0.1", "Use of Restricted Function")]
    assert "RIS000101" in alerts[0].description and "other content" in alerts[0].description
    assert len(recorded(engine, "Order Record")) == 1


# --- HTTP ----------------------------------------------------------------------------------------------

@pytest.fixture
def http(engine: Engine) -> Iterator[TestClient]:
    settings = load_settings(database_url=engine.url.render_as_string(hide_password=False),
                             api_tokens=f"{WRITE}:write", mappings_dir=ROOT / "mappings", redis_url="")
    with TestClient(create_app(settings, engine), client=("10.1.2.3", 50123)) as client:
        yield client


def step_body(**changes: Any) -> dict[str, Any]:
    body = {"patient_id": "P-100", "issuer_of_patient_id": "CITY", "patient_name": "DOE^JANE",
            "placer_order_number": "WEB-1", "accession_number": "WACC1", "modality": "MR",
            "study_instance_uid": "1.2.3.4.5.6", "scheduled_start": "2026-11-23T10:15:00"}
    return {**body, **changes}


def test_http_changes_are_order_records_of_the_token_and_client(engine: Engine, http: TestClient) -> None:
    auth = {"Authorization": f"Bearer {WRITE}"}
    created = http.post("/api/steps", json=step_body(), headers=auth)
    assert created.status_code == 201, created.text
    step_id = created.json()["procedures"][0]["steps"][0]["id"]
    assert http.put(f"/api/steps/{step_id}", json=step_body(modality="CT"), headers=auth).status_code == 200
    assert http.delete(f"/api/steps/{step_id}", headers=auth).status_code == 200
    assert http.post("/api/steps", json=step_body(), headers=auth).status_code == 409  # refused: no record
    order = {"patients": ("P-100^^^CITY",), "orders": ("WACC1",), "studies": ("1.2.3.4.5.6",)}
    label = "token writ\u2026"
    assert recorded(engine) == [Rec("Order Record", action, label, "10.1.2.3", **order) for action in "CUD"]


def test_a_replay_over_http_is_a_security_alert_even_when_refused(engine: Engine, http: TestClient) -> None:
    auth = {"Authorization": f"Bearer {WRITE}"}
    created = http.post("/api/steps", json=step_body(), headers=auth).json()
    replayed = http.post(f"/api/messages/{created['message_id']}/replay", headers=auth)
    assert replayed.status_code == 200 and replayed.json()["ack_code"] == "AE"  # the order exists already
    [alert] = recorded(engine, "Security Alert")
    assert (alert.action, alert.user, alert.host, alert.alert) == ("E", "token writ\u2026", "10.1.2.3",
                                                                  "Use of Restricted Function")
    assert f"#{created['message_id']} replayed" in alert.description
    assert len(recorded(engine, "Order Record")) == 1  # the replay changed nothing


# --- DICOM ---------------------------------------------------------------------------------------------

def dicom_settings(engine: Engine) -> Any:
    return load_settings(database_url=engine.url.render_as_string(hide_password=False), redis_url="",
                         dicom_host="127.0.0.1", dicom_port=free_port(), dicom_peers="ARCHIVE@127.0.0.1:9",
                         stgcmt_archive_ae="ARCHIVE", stgcmt_timeout=3600)


def associate(port: int, ae_title: str, *contexts: str) -> Any:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in contexts:
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title="BROKER")
    assert assoc.is_established
    return assoc


def test_mpps_ian_and_commitment_are_procedure_records(engine: Engine, mappings: MappingSet) -> None:
    order = schedule(engine, mappings)  # by an intake that does not record: the trail starts empty here
    assert recorded(engine) == []
    settings = dicom_settings(engine)
    workflow = build_workflow(settings, engine)
    subject = {"patients": (PATIENT,), "orders": (order.accession_number,), "studies": (order.study_instance_uid,)}
    uid, images = str(generate_uid()), [str(generate_uid()), str(generate_uid())]
    with dicom_server(settings, engine.url.render_as_string(hide_password=False), workflow) as server:
        modality = associate(server.port, "CT01", ModalityPerformedProcedureStep)
        try:
            status, _ = modality.send_n_create(mpps_create(order.study_instance_uid, order.sps_id),
                                               ModalityPerformedProcedureStep, uid)
            assert status.Status == SUCCESS
            status, _ = modality.send_n_set(mpps_final("COMPLETED", images), ModalityPerformedProcedureStep, uid)
            assert status.Status == SUCCESS
            # refused (the PPS is COMPLETED): no record
            status, _ = modality.send_n_set(mpps_final("COMPLETED", images), ModalityPerformedProcedureStep, uid)
            assert status.Status == PROCESSING_FAILURE
        finally:
            modality.release()
        archive = associate(server.port, "ARCHIVE", InstanceAvailabilityNotification)
        try:
            status, _ = archive.send_n_create(ian(order.study_instance_uid, uid, images),
                                              InstanceAvailabilityNotification, str(generate_uid()))
            assert status.Status == SUCCESS
        finally:
            archive.release()
        [(request, _)] = commitment(engine)
        event_type, info = report_dataset(request.transaction_uid, [(CT_IMAGE, i) for i in images])
        reporter = AE(ae_title="ARCHIVE")
        reporter.add_requested_context(StorageCommitmentPushModel)
        from pynetdicom import build_role

        assoc = reporter.associate("127.0.0.1", server.port, ae_title="BROKER",
                                   ext_neg=[build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)])
        assert assoc.is_established
        try:
            status, _ = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel, STGCMT_INSTANCE)
            assert status.Status == SUCCESS
        finally:
            assoc.release()
    step = {**subject, "procedures": (order.sps_id,)}
    assert recorded(engine) == [
        Rec("Procedure Record", "C", "CT01", "127.0.0.1", description="MPPS IN PROGRESS", **step),
        Rec("Procedure Record", "U", "CT01", "127.0.0.1", description="MPPS COMPLETED", **step),
        Rec("Procedure Record", "U", "ARCHIVE", "127.0.0.1", description="IAN: images available (2 instance(s))",
            **subject),
        Rec("Procedure Record", "U", "ARCHIVE", "127.0.0.1", description="Storage Commitment committed", **subject)]


def test_a_commitment_timeout_is_recorded_as_the_brokers_own_change(engine: Engine, mappings: MappingSet) -> None:
    order = schedule(engine, mappings)
    config = WorkflowConfig(archive_ae="ARCHIVE", stgcmt_timeout=0, audit=True)
    mpps = MppsService(engine, config)
    uid = str(generate_uid())
    assert mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01", "10.0.0.7").ok
    assert mpps.update(uid, mpps_final("COMPLETED", [str(generate_uid())]), "CT01", "10.0.0.7").ok
    workflow = build_workflow(load_settings(database_url=engine.url.render_as_string(hide_password=False),
                                            redis_url="", dicom_peers="ARCHIVE@127.0.0.1:9",
                                            stgcmt_archive_ae="ARCHIVE", stgcmt_timeout=0.001), engine)
    assert workflow.commitment.sweep_timeouts() == 1
    last = recorded(engine)[-1]
    assert (last.event, last.action, last.user, last.host, last.patients, last.studies) == (
        "Procedure Record", "U", "broker", "", (PATIENT,), (order.study_instance_uid,))
    assert last.description.startswith("Storage Commitment failed: no answer")
    assert [r.host for r in recorded(engine)[:2]] == ["10.0.0.7", "10.0.0.7"]


def test_ups_create_and_state_changes_are_recorded_and_refusals_are_not(engine: Engine) -> None:
    settings = dicom_settings(engine)
    uid, transaction = str(generate_uid()), str(generate_uid())
    request_study = str(generate_uid())
    dataset = workitem()
    dataset.ReferencedRequestSequence[0].StudyInstanceUID = request_study
    with dicom_server(settings, engine.url.render_as_string(hide_password=False),
                      build_workflow(settings, engine)) as server:
        scu = ups_scu(server.port, "PERFORMER")
        try:
            assert create(scu, dataset, uid) == SUCCESS
            assert change_state(scu, uid, "COMPLETED", transaction) != SUCCESS  # refused: SCHEDULED
            assert change_state(scu, uid, "IN PROGRESS", transaction) == SUCCESS
            assert change_state(scu, uid, "IN PROGRESS", str(generate_uid())) != SUCCESS  # wrong transaction
            assert n_set(scu, uid, progress(transaction, 50)) == SUCCESS
            assert n_set(scu, uid, progress(str(generate_uid()), 60)) != SUCCESS  # not the performer's
            assert int(action(scu, uid, CHANGE_STATE, ProcedureStepState="CANCELED",
                              TransactionUID=transaction).Status) == SUCCESS
        finally:
            scu.release()
    patient = ("PUPS1^^^CITYMED",)
    subject = {"patients": patient, "orders": ("AUPS1",), "studies": (request_study,), "procedures": (uid,)}
    assert recorded(engine) == [
        Rec("Order Record", "C", "PERFORMER", "127.0.0.1", patient, ("AUPS1",), (request_study,)),
        Rec("Procedure Record", "C", "PERFORMER", "127.0.0.1", description="UPS SCHEDULED", **subject),
        Rec("Procedure Record", "U", "PERFORMER", "127.0.0.1", description="UPS SCHEDULED -> IN PROGRESS",
            **subject),
        Rec("Procedure Record", "U", "PERFORMER", "127.0.0.1", description="UPS attributes updated (1)",
            **subject),
        Rec("Procedure Record", "U", "PERFORMER", "127.0.0.1", description="UPS IN PROGRESS -> CANCELED",
            **subject)]


def test_a_change_rolled_back_by_an_error_inside_it_leaves_no_record(engine: Engine, mappings: MappingSet) -> None:
    """MPPS COMPLETED moves the step and procedure, then asking for commitment fails inside the same
    transaction: the change and its Procedure Record are both absent; without the failure both are there."""
    order = schedule(engine, mappings)

    class FailingCommitment:
        def request_commitment(self, db: Connection, procedure_pk: int) -> str | None:
            raise OperationalError("INSERT INTO commitment_requests", {}, Exception("the disk is full"))

    config = WorkflowConfig(audit=True)
    uid = str(generate_uid())
    assert MppsService(engine, config).create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01").ok
    failing = MppsService(engine, config, commitment=FailingCommitment())
    assert failing.update(uid, mpps_final("COMPLETED"), "CT01").status == PROCESSING_FAILURE
    with engine.connect() as db:
        mpps = table_of(MppsInstance)
        assert db.execute(select(mpps.c.status).where(mpps.c.sop_instance_uid == uid)).scalar_one() == "IN PROGRESS"
        assert db.execute(select(STEPS.c.sps_status).where(STEPS.c.id == order.step_pk)).scalar_one() == "STARTED"
    assert [r.description for r in recorded(engine)] == ["MPPS IN PROGRESS"]
    assert MppsService(engine, config).update(uid, mpps_final("COMPLETED"), "CT01").ok
    assert [r.description for r in recorded(engine)] == ["MPPS IN PROGRESS", "MPPS COMPLETED"]
