"""The REST API on real databases (SQLite and PostgreSQL) with data made by the real HL7 intake.

Each test builds the FastAPI app on the fixture's engine and calls it through Starlette's TestClient
(in-process HTTP); the orders come in through ``Intake.handle`` exactly as from the MLLP listener.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update

from broker.config import load_settings
from broker.dicom_json import value
from broker.domain.procedure_states import ProcedureState
from broker.domain.procedure_tracker import ProcedureTracker
from broker.domain.records import Cause
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.outbox import outbox
from broker.store.tables import InboundMessage, OutboxEvent, ScheduledStep, table_of
from broker.web.app import create_app
from tests.conftest import ROOT, sample
from tests.events_support import schedule

pytestmark = pytest.mark.integration
READ = "read-token-0123456789"
WRITE = "write-token-0123456789"
AS_READER = {"Authorization": f"Bearer {READ}"}
AS_WRITER = {"Authorization": f"Bearer {WRITE}"}
STEPS = table_of(ScheduledStep)
MESSAGES = table_of(InboundMessage)


def make_client(engine: Engine, mappings_dir: Path = ROOT / "mappings", **settings: Any) -> TestClient:
    values = {"database_url": engine.url.render_as_string(hide_password=False),
              "api_tokens": f"{READ}:read,{WRITE}:write", "mappings_dir": mappings_dir, **settings}
    return TestClient(create_app(load_settings(**values), engine))


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with make_client(engine) as test_client:
        yield test_client


# --- tokens and health ------------------------------------------------------------------------------
def test_no_token_no_data_and_read_tokens_cannot_write(client: TestClient, engine: Engine,
                                                      mappings: MappingSet) -> None:
    schedule(engine, mappings)
    for path in ("/api/procedures", "/api/procedures/1", "/api/messages", "/api/events/failed", "/metrics",
                 "/api/board/summary", "/api/stream"):
        answer = client.get(path)
        assert answer.status_code == 401, path
        assert "MLLER" not in answer.text
    assert client.get("/api/procedures", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    assert client.get("/api/procedures", headers=AS_READER).status_code == 200
    refused = client.delete("/api/steps/1", headers=AS_READER)
    assert refused.status_code == 403 and "write" in refused.json()["detail"]
    assert client.post("/api/messages/1/replay", headers=AS_READER).status_code == 403
    # the page shell and health need no token
    assert client.get("/board").status_code == 200
    assert client.get("/healthz").json() == {"status": "ok"}


def test_without_configured_tokens_nothing_is_served(engine: Engine) -> None:
    with make_client(engine, api_tokens="") as client:
        assert client.get("/api/procedures", headers=AS_READER).status_code == 401
        assert client.get("/readyz").status_code == 200


def test_readyz_checks_the_database_schema_and_redis(engine: Engine) -> None:
    with make_client(engine, redis_url="redis://127.0.0.1:6379/0") as client:
        answer = client.get("/readyz")
        assert answer.status_code == 200
        assert answer.json() == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}
    with make_client(engine, redis_url="redis://127.0.0.1:1/0") as client:
        answer = client.get("/readyz")
        assert answer.status_code == 503
        assert answer.json()["checks"]["database"] == "ok"
        assert answer.json()["checks"]["redis"].startswith("unreachable")


def test_readyz_refuses_an_old_schema(database_url: str) -> None:
    from broker.store import migrate
    from broker.store.session import make_engine

    engine = make_engine(database_url)
    try:
        migrate.upgrade(engine, "0001")
        with make_client(engine) as client:
            answer = client.get("/readyz")
        assert answer.status_code == 503
        assert "schema not current" in answer.json()["checks"]["database"]
    finally:
        engine.dispose()


# --- procedures -------------------------------------------------------------------------------------
def test_procedures_list_filters_and_pages(client: TestClient, engine: Engine, mappings: MappingSet) -> None:
    first = schedule(engine, mappings)
    for number in (2, 3, 4):
        schedule(engine, mappings, number)
    everything = client.get("/api/procedures", headers=AS_READER).json()
    assert everything["total"] == 4
    row = next(p for p in everything["items"] if p["id"] == first.procedure_pk)
    assert row["accession_number"] == "ACC77001" and row["state"] == "SCHEDULED"
    assert row["modality"] == "CT" and row["patient_id"] == "MRN4711"
    assert row["patient_name"].startswith("M\u00dcLLER^ERIKA")
    assert row["steps"][0]["sps_id"] == "SPS77001" and row["scheduled_start"] == "2026-11-23T09:30:00"

    def total(**query: str) -> int:
        answer = client.get("/api/procedures", params=query, headers=AS_READER)
        assert answer.status_code == 200, answer.text
        return int(answer.json()["total"])

    assert total(date="2026-11-23") == 4
    assert total(date="2026-11-24") == 0
    assert total(modality="CT") == 4 and total(modality="MR") == 0
    assert total(status="SCHEDULED") == 4 and total(status="STARTED,COMPLETED") == 0
    assert total(patient="MRN4711") == 4 and total(patient="m\u00fcl") == 4 and total(patient="DOE") == 0
    assert total(accession="ACC90002") == 1
    page = client.get("/api/procedures", params={"limit": 3, "offset": 2}, headers=AS_READER).json()
    assert (page["total"], len(page["items"]), page["offset"]) == (4, 2, 2)
    assert client.get("/api/procedures", params={"date": "23.11.2026"}, headers=AS_READER).status_code == 422


def test_one_procedure_has_its_timeline_and_worklist_item(client: TestClient, engine: Engine,
                                                          mappings: MappingSet) -> None:
    scheduled = schedule(engine, mappings)
    with engine.begin() as db:
        ProcedureTracker().advance(db, scheduled.procedure_pk, ProcedureState.STARTED,
                                   Cause("MPPS N-CREATE 1.2.3", event_kind="mpps", event_ref="1.2.3"))
    detail = client.get(f"/api/procedures/{scheduled.procedure_pk}", headers=AS_READER).json()
    assert detail["state"] == "STARTED"
    assert [(t["from"], t["to"], t["event"]) for t in detail["timeline"]] == [("SCHEDULED", "STARTED", "mpps 1.2.3")]
    assert detail["placer_order_number"] == "PO-77001"
    answer = client.get(f"/api/procedures/{scheduled.procedure_pk}/worklist", headers=AS_READER)
    assert answer.headers["content-type"].startswith("application/dicom+json")
    with engine.connect() as db:
        stored = db.execute(select(STEPS.c.item).where(STEPS.c.id == scheduled.step_pk)).scalar_one()
    assert answer.json() == [stored]
    assert value(answer.json()[0], "AccessionNumber") == "ACC77001"
    item = client.get(f"/api/steps/{scheduled.step_pk}/worklist-item", headers=AS_READER)
    assert item.json() == stored and item.headers["content-type"].startswith("application/dicom+json")
    assert client.get("/api/procedures/999", headers=AS_READER).status_code == 404
    assert client.get("/api/steps/999/worklist-item", headers=AS_READER).status_code == 404


# --- failed events ----------------------------------------------------------------------------------
def test_failed_events_are_listed_and_retried(client: TestClient, engine: Engine) -> None:
    events = table_of(OutboxEvent)
    with engine.begin() as db:
        event_id = outbox.add_event(db, outbox.RIS_STATUS, {"x": 1}, "order:1", datetime.now())
        db.execute(update(events).values(status="failed", attempts=10, last_error="ConnectionRefusedError: RIS"))
    failed = client.get("/api/events/failed", headers=AS_READER).json()
    assert [(e["event_id"], e["kind"], e["attempts"]) for e in failed] == [(event_id, "ris.status", 10)]
    assert "ConnectionRefusedError" in failed[0]["last_error"]
    assert client.post(f"/api/events/{failed[0]['id']}/retry", headers=AS_READER).status_code == 403
    retried = client.post(f"/api/events/{failed[0]['id']}/retry", headers=AS_WRITER)
    assert retried.status_code == 200 and retried.json()["status"] == "pending"
    with engine.connect() as db:
        assert db.execute(select(events.c.status, events.c.attempts)).one() == ("pending", 0)
    assert client.get("/api/events/failed", headers=AS_READER).json() == []
    assert client.post(f"/api/events/{event_id}/retry", headers=AS_WRITER).status_code == 404


# --- message archive --------------------------------------------------------------------------------
def test_message_archive_search_and_view(client: TestClient, engine: Engine, mappings: MappingSet) -> None:
    intake = Intake(engine, mappings)
    intake.handle(sample("orm_o01_new.hl7"), "10.0.0.7:5000")
    intake.handle(sample("orm_o01_bad_fields.hl7"), "10.0.0.7:5000")
    found = client.get("/api/messages", params={"control_id": "RIS000101"}, headers=AS_READER).json()
    assert found["total"] == 1
    [row] = found["items"]
    assert (row["message_type"], row["status"], row["ack_code"], row["sender"]) == (
        "ORM^O01", "accepted", "AA", "EPICRIS^GENHOSP")
    refused = client.get("/api/messages", params={"status": "error"}, headers=AS_READER).json()["items"]
    assert [m["control_id"] for m in refused] == ["RIS000199"]
    assert client.get("/api/messages", params={"message_type": "ADT"}, headers=AS_READER).json()["total"] == 0
    assert client.get("/api/messages", params={"sender": "EPICRIS"}, headers=AS_READER).json()["total"] == 2
    detail = client.get(f"/api/messages/{row['id']}", headers=AS_READER).json()
    assert detail["text"].splitlines()[1].startswith("PID|1||MRN4711^^^GENHOSP^MR||M\u00dcLLER^ERIKA")
    assert detail["ack"][0].splitlines()[1].startswith("MSA|AA|RIS000101")
    assert client.get("/api/messages/999", headers=AS_READER).status_code == 404


def test_replay_after_a_mapping_fix(engine: Engine, tmp_path: Path) -> None:
    mappings_dir = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings_dir)
    default = mappings_dir / "default.yaml"
    # A message without OBR-18 (accession number): refused by the mapping as it is ...
    raw = sample("orm_o01_new.hl7").replace(b"||ACC77001|RP77001|", b"|||RP77001|")
    with make_client(engine, mappings_dir) as client:
        intake = client.app.state.intake()  # type: ignore[attr-defined]
        [ack] = intake.handle(raw, "10.0.0.7:5000")
        assert b"MSA|AE" in ack
        original = client.get("/api/messages", params={"control_id": "RIS000101"}, headers=AS_READER).json()
        message_id = original["items"][0]["id"]
        again = client.post(f"/api/messages/{message_id}/replay", headers=AS_WRITER).json()
        assert (again["status"], again["control_id"]) == ("error", "RIS000101-R1")
        assert "AccessionNumber" in again["error"] or "OBR-18" in again["error"]
        # ... and taken after the mapping is fixed to read the accession number from the filler number.
        default.write_text(default.read_text().replace("AccessionNumber: {source: [IPC-1, OBR-18], required: true}",
                                                       "AccessionNumber: {source: [IPC-1, OBR-18, OBR-3], "
                                                       "required: true}"))
        fixed = client.post(f"/api/messages/{message_id}/replay", headers=AS_WRITER).json()
        assert (fixed["status"], fixed["ack_code"], fixed["control_id"]) == ("accepted", "AA", "RIS000101-R2")
        procedures = client.get("/api/procedures", headers=AS_READER).json()["items"]
        assert [p["accession_number"] for p in procedures] == ["FO-77001"]
        detail = client.get(f"/api/messages/{message_id}", headers=AS_READER).json()
        assert [r["control_id"] for r in detail["replays"]] == ["RIS000101-R1", "RIS000101-R2"]
        assert all(r["peer"].startswith(f"replay of #{message_id} by token writ") for r in detail["replays"])
        assert detail["status"] == "error"  # the original row is kept as it was


# --- create / change / cancel over HTTP -------------------------------------------------------------
def step_body(**changes: Any) -> dict[str, Any]:
    body = {"patient_id": "P-100", "issuer_of_patient_id": "CITY", "patient_name": "DOE^JANE",
            "patient_birth_date": "1970-01-02", "patient_sex": "F", "placer_order_number": "WEB-1",
            "placer_issuer": "PORTAL", "accession_number": "WACC1", "modality": "MR",
            "procedure_code": {"value": "MRBRAIN", "meaning": "MR BRAIN", "scheme": "LOCAL"},
            "station_ae_title": "MR1", "station_name": "MR_ROOM_1", "location": "MRI SUITE A",
            "scheduled_start": "2026-11-23T10:15:00", "priority": "STAT"}
    body.update(changes)
    return body


def test_a_step_created_over_http_is_like_one_from_hl7(client: TestClient, engine: Engine) -> None:
    answer = client.post("/api/steps", json=step_body(), headers=AS_WRITER)
    assert answer.status_code == 201, answer.text
    created = answer.json()
    [procedure] = created["procedures"]
    assert (procedure["state"], procedure["accession_number"], procedure["modality"]) == ("SCHEDULED", "WACC1", "MR")
    [step] = procedure["steps"]
    assert (step["status"], step["station_ae_title"], step["station_name"], step["location"]) == (
        "SCHEDULED", "MR1", "MR_ROOM_1", "MRI SUITE A")
    item = client.get(f"/api/steps/{step['id']}/worklist-item", headers=AS_READER).json()
    assert value(item, "PatientName") == "DOE^JANE" and value(item, "PatientID") == "P-100"
    assert value(item, "IssuerOfPatientID") == "CITY" and value(item, "PatientBirthDate") == "19700102"
    assert value(item, "RequestedProcedurePriority") == "STAT"
    assert value(item, "PlacerOrderNumberImagingServiceRequest") == "WEB-1"
    assert value(item, "StudyInstanceUID")  # generated, as for an HL7 order without one
    sps = item["00400100"]["Value"][0]
    assert value(sps, "ScheduledProcedureStepStartDate") == "20261123"
    assert value(sps, "ScheduledProcedureStepStartTime") == "101500"
    assert value(sps, "ScheduledProcedureStepID") == "WACC1"
    # the archive holds the HL7 message the request became, accepted, naming the token
    message = client.get(f"/api/messages/{created['message_id']}", headers=AS_READER).json()
    assert (message["sender"], message["message_type"], message["status"]) == ("WLBROKER_API^HTTP", "OMI^O23",
                                                                               "accepted")
    assert message["peer"] == "http token writ\u2026"
    # the same order again is refused as HL7 would refuse it
    again = client.post("/api/steps", json=step_body(), headers=AS_WRITER)
    assert again.status_code == 409
    assert again.json()["detail"][0]["loc"] == ["body", "placer_order_number"]


def test_bad_steps_are_refused_naming_the_field(client: TestClient, engine: Engine) -> None:
    missing = client.post("/api/steps", json=step_body(modality=None), headers=AS_WRITER)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "modality"]
    bad_uid = client.post("/api/steps", json=step_body(study_instance_uid="not-a-uid"), headers=AS_WRITER)
    assert bad_uid.status_code == 422, bad_uid.text
    assert bad_uid.json()["detail"][0]["loc"] == ["body", "study_instance_uid"]
    with engine.connect() as db:
        assert db.execute(select(STEPS.c.id)).first() is None
        refused = db.execute(select(MESSAGES.c.status)).scalars().all()
    assert refused == ["error"]  # archived and answered, nothing else stored


def test_change_and_cancel_over_http(client: TestClient, engine: Engine) -> None:
    created = client.post("/api/steps", json=step_body(), headers=AS_WRITER).json()
    step_id = created["procedures"][0]["steps"][0]["id"]
    changed = client.put(f"/api/steps/{step_id}", json=step_body(scheduled_start="2026-11-23T14:00:00",
                                                                 station_ae_title="MR2"), headers=AS_WRITER)
    assert changed.status_code == 200, changed.text
    [step] = changed.json()["procedures"][0]["steps"]
    assert (step["id"], step["scheduled_start"], step["station_ae_title"]) == (step_id, "2026-11-23T14:00:00", "MR2")
    moved = client.put(f"/api/steps/{step_id}", json=step_body(placer_order_number="OTHER"), headers=AS_WRITER)
    assert moved.status_code == 422 and moved.json()["detail"][0]["loc"] == ["body", "placer_order_number"]
    canceled = client.delete(f"/api/steps/{step_id}", headers=AS_WRITER)
    assert canceled.status_code == 200, canceled.text
    [procedure] = canceled.json()["procedures"]
    assert (procedure["state"], procedure["steps"][0]["status"]) == ("CANCELED", "CANCELED")
    timeline = client.get(f"/api/procedures/{procedure['id']}", headers=AS_READER).json()["timeline"]
    assert [t["to"] for t in timeline] == ["CANCELED"] and timeline[0]["event"].startswith("hl7 API")
    assert client.delete("/api/steps/999", headers=AS_WRITER).status_code == 404


def test_a_change_of_a_multi_step_order_is_refused(client: TestClient, engine: Engine, mappings: MappingSet) -> None:
    Intake(engine, mappings).handle(sample("omi_o23_two_steps.hl7"))
    with engine.connect() as db:
        first = db.execute(select(STEPS.c.id).order_by(STEPS.c.id)).scalars().first()
    answer = client.put(f"/api/steps/{first}", json=step_body(), headers=AS_WRITER)
    assert answer.status_code == 409 and "2 steps" in answer.json()["detail"]


# --- board figures, metrics, OpenAPI ------------------------------------------------------------------
def test_day_summary_counts_and_turnarounds(client: TestClient, engine: Engine, mappings: MappingSet) -> None:
    done = schedule(engine, mappings)
    schedule(engine, mappings, 2)
    with engine.connect() as db:
        ordered = db.execute(select(table_of(ScheduledStep).c.created_at)).scalars().first()
    assert ordered is not None
    moments = iter([ordered + timedelta(minutes=m) for m in (30, 45, 50)])
    tracker = ProcedureTracker(clock=lambda: next(moments))
    with engine.begin() as db:
        for state in (ProcedureState.STARTED, ProcedureState.COMPLETED, ProcedureState.IMAGES_AVAILABLE):
            tracker.advance(db, done.procedure_pk, state, Cause("test", event_kind="mpps", event_ref="1.2"))
    summary = client.get("/api/board/summary", params={"date": "2026-11-23"}, headers=AS_READER).json()
    assert summary["total"] == 2
    assert summary["by_state"] == {"IMAGES AVAILABLE": 1, "SCHEDULED": 1}
    assert summary["by_hour"][9] == {"hour": 9, "total": 2, "done": 1}
    assert sum(h["total"] for h in summary["by_hour"]) == 2
    figures = summary["turnaround"]
    assert figures["order_to_start"]["count"] == 1 and figures["order_to_start"]["median_seconds"] == 1800
    assert figures["start_to_complete"]["median_seconds"] == 900
    assert figures["complete_to_images"]["median_seconds"] == 300
    empty = client.get("/api/board/summary", params={"date": "2026-11-24"}, headers=AS_READER).json()
    assert empty["total"] == 0 and empty["turnaround"]["order_to_start"]["median_seconds"] is None


def test_metrics_exposition(client: TestClient, engine: Engine, listener: int, mappings: MappingSet) -> None:
    from broker.hl7.mllp_client import MLLPClient
    from broker.metrics import HL7_MESSAGES

    before = HL7_MESSAGES.labels("ORM^O01", "AA")._value.get()
    with MLLPClient("127.0.0.1", listener) as mllp:
        mllp.send(sample("orm_o01_new.hl7"))
    with engine.begin() as db:
        outbox.add_event(db, outbox.RIS_STATUS, {}, "", datetime.now())
    text = client.get("/metrics", headers=AS_READER).text
    assert HL7_MESSAGES.labels("ORM^O01", "AA")._value.get() == before + 1
    assert 'broker_hl7_messages_total{message_type="ORM^O01",outcome="AA"}' in text
    assert 'broker_outbox_events{status="pending"} 1.0' in text
    assert 'broker_outbox_events{status="failed"} 0.0' in text
    assert "broker_ups_subscriptions " in text
    assert "broker_mwl_cfind_seconds_bucket" in text


def test_openapi_describes_the_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in [("/api/procedures", "get"), ("/api/procedures/{procedure_id}", "get"),
                         ("/api/procedures/{procedure_id}/worklist", "get"), ("/api/steps", "post"),
                         ("/api/steps/{step_id}", "put"), ("/api/steps/{step_id}", "delete"),
                         ("/api/messages", "get"), ("/api/messages/{message_id}", "get"),
                         ("/api/messages/{message_id}/replay", "post"), ("/api/events/failed", "get"),
                         ("/api/events/{event}/retry", "post"), ("/healthz", "get"), ("/readyz", "get"),
                         ("/metrics", "get"), ("/api/stream", "get"), ("/api/board/summary", "get")]:
        assert method in paths.get(path, {}), (path, method)
    assert "StepIn" in spec["components"]["schemas"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
