"""Searching the audit trail: ``GET /api/audit`` (audit role only) and ``broker audit``, by time, patient,
user and event, on both databases."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from importlib import resources

import pytest
from fastapi.testclient import TestClient
from lxml import etree
from sqlalchemy import Engine

from broker.audit import events
from broker.audit.events import Source
from broker.audit.trail import broker_participant, record
from broker.config import load_settings
from broker.web.app import create_app
from tests.conftest import ROOT
from tests.integration.test_cli import env_for, run_cli

pytestmark = pytest.mark.integration
SCHEMA = etree.RelaxNG(etree.fromstring(
    resources.files("broker.audit").joinpath("dicom-audit-message.rng").read_bytes()))
AUDIT, READ, WRITE = "audit-token-0123456789", "read-token-0123456789", "write-token-0123456789"
BROKER = broker_participant("BROKER")
DAY = datetime(2026, 12, 3)


def _seed(engine: Engine) -> None:
    hl7, modality = Source("RIS^HOSP", "10.0.0.1", "hl7"), Source("CT01", "10.0.0.2", "dicom")
    with engine.begin() as db:
        record(db, events.order_record("C", hl7, BROKER, patient_id="P1^^^HOSP", accession_number="A1",
                                       study_uid="1.2.1"), DAY.replace(hour=8))
        record(db, events.query(modality, BROKER, what="1.2.840.10008.5.1.4.31", query_bytes=b"q",
                                patient_ids=("P1^^^HOSP", "P2")), DAY.replace(hour=9))
        record(db, events.patient_record("U", hl7, BROKER, patient_id="P2"), DAY.replace(hour=10))
        record(db, events.security_alert(Source("unknown", "10.0.0.9", "dicom"), BROKER,
                                         alert=events.NODE_AUTHENTICATION, reason="unknown ca"), DAY.replace(hour=11))


@pytest.fixture
def http(engine: Engine) -> Iterator[TestClient]:
    _seed(engine)
    settings = load_settings(database_url=engine.url.render_as_string(hide_password=False),
                             api_tokens=f"{AUDIT}:audit,{READ}:read,{WRITE}:write", mappings_dir=ROOT / "mappings")
    with TestClient(create_app(settings, engine)) as client:
        yield client


def _ids(client: TestClient, **query: str) -> list[int]:
    response = client.get("/api/audit", params=query, headers={"Authorization": f"Bearer {AUDIT}"})
    assert response.status_code == 200, response.text
    return [entry["id"] for entry in response.json()]


def test_api_searches_by_time_patient_user_and_event(http: TestClient) -> None:
    assert _ids(http) == [4, 3, 2, 1]  # newest first
    assert _ids(http, since="2026-12-03T09:00:00", until="2026-12-03T11:00:00") == [3, 2]
    assert _ids(http, patient="P1") == [2, 1]  # the bare ID finds ID^^^issuer
    assert _ids(http, patient="P1^^^HOSP") == [2, 1]
    assert _ids(http, patient="P2") == [3, 2]  # a query's second patient too
    assert _ids(http, user="CT01") == [2]
    assert _ids(http, event="security") == [4]
    assert _ids(http, event="110109") == [1]
    assert _ids(http, limit="1") == [4]
    assert _ids(http, user="RIS^HOSP", event="patient") == [3]


def test_api_answers_each_record_with_its_audit_message(http: TestClient) -> None:
    response = http.get("/api/audit", params={"event": "query"}, headers={"Authorization": f"Bearer {AUDIT}"})
    (entry,) = response.json()
    assert (entry["event"], entry["event_id"], entry["action"], entry["user_id"], entry["host"]) \
        == ("query", "110112", "E", "CT01", "10.0.0.2")
    assert entry["patient_ids"] == ["P1^^^HOSP", "P2"]
    assert entry["delivered_at"] is None
    assert SCHEMA.validate(etree.fromstring(entry["xml"].encode())), SCHEMA.error_log


def test_api_is_for_the_audit_role_only(http: TestClient) -> None:
    assert http.get("/api/audit").status_code == 401
    assert http.get("/api/audit", headers={"Authorization": "Bearer not-a-token-at-all"}).status_code == 401
    assert http.get("/api/audit", headers={"Authorization": f"Bearer {READ}"}).status_code == 403
    assert http.get("/api/audit", headers={"Authorization": f"Bearer {WRITE}"}).status_code == 403
    bad = http.get("/api/audit", params={"event": "nonsense"}, headers={"Authorization": f"Bearer {AUDIT}"})
    assert bad.status_code == 422


def test_cli_searches_the_same_way(engine: Engine, database_url: str) -> None:
    _seed(engine)
    env = env_for(database_url)
    result = run_cli("audit", "--patient", "P2", "--json", env=env)
    assert result.returncode == 0, result.stderr
    found = [json.loads(line) for line in result.stdout.splitlines()]
    assert [entry["id"] for entry in found] == [3, 2]
    result = run_cli("audit", "--since", "2026-12-03T10:30", "--event", "security", env=env)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["id", "recorded_at", "event"]
    assert len(rows) == 1 and rows[0].split()[:3] == ["4", "2026-12-03T11:00:00", "security"]
    result = run_cli("audit", "--user", "RIS^HOSP", "--xml", env=env)
    messages = result.stdout.splitlines()
    assert len(messages) == 2
    assert all(SCHEMA.validate(etree.fromstring(m.encode())) for m in messages)
    assert run_cli("audit", "--event", "nonsense", env=env).returncode == 2
