"""The board's API on real databases (SQLite and PostgreSQL) with orders from the real HL7 intake: the
wall role sees the wall and nothing else, the wall never names a patient in full, delays are flagged,
listed and counted in /metrics, and "today" is the broker's zone's."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from starlette.testclient import WebSocketDenialResponse

from broker.board.zone import host_zone_name
from broker.config import load_settings
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.web.app import create_app
from tests.conftest import ROOT, sample

pytestmark = pytest.mark.integration
READ = "read-token-0123456789"
WALL = "wall-token-0123456789"
AS_READER = {"Authorization": f"Bearer {READ}"}
AS_WALL = {"Authorization": f"Bearer {WALL}"}
WALL_ROUTES = {"/api/board/wall", "/api/board/wall/stream"}
OPEN_ROUTES = {"/", "/board", "/healthz", "/readyz", "/openapi.json"}


def order(number: int, start: datetime, name: bytes = b"M\xdcLLER^ERIKA^A^^FRAU", modality: bytes = b"CT") -> bytes:
    """The sample ORM^O01 made unique by ``number``, scheduled at ``start`` (naive: the RIS's wall clock)."""
    raw = sample("orm_o01_new.hl7")
    for old, new in ((b"RIS000101", f"RIS8{number:05d}".encode()), (b"-77001", f"-8{number:04d}".encode()),
                     (b"ACC77001", f"ACC8{number:04d}".encode()), (b"RP77001", f"RP8{number:04d}".encode()),
                     (b"SPS77001", f"SPS8{number:04d}".encode()), (b"10.543.77001", f"10.543.8{number:04d}".encode()),
                     (b"MRN4711", f"MRN{number:07d}".encode()), (b"M\xdcLLER^ERIKA^A^^FRAU", name),
                     (b"||||CT|||", b"||||" + modality + b"|||"),
                     (b"20261123093000", start.strftime("%Y%m%d%H%M%S").encode())):
        raw = raw.replace(old, new)
    return raw


def place(engine: Engine, mappings: MappingSet, raw: bytes) -> None:
    [ack] = Intake(engine, mappings).handle(raw)
    assert b"MSA|AA" in ack, ack


def make_client(engine: Engine, **settings: Any) -> TestClient:
    values = {"database_url": engine.url.render_as_string(hide_password=False), "mappings_dir": ROOT / "mappings",
              "api_tokens": f"{READ}:read,{WALL}:wall", **settings}
    return TestClient(create_app(load_settings(**values), engine))


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with make_client(engine) as test_client:
        yield test_client


def test_the_wall_token_reads_the_wall_and_nothing_else(client: TestClient) -> None:
    checked = 0
    for path, operations in client.get("/openapi.json").json()["paths"].items():  # every route the API has
        if path in OPEN_ROUTES or path in WALL_ROUTES:
            continue
        concrete = re.sub(r"\{[^}]+\}", "1", path)
        for method in operations:
            answer = client.request(method.upper(), concrete, headers=AS_WALL)
            if answer.status_code == 426:  # a WebSocket resource (DICOMweb's event channel): its handshake refuses
                with pytest.raises(WebSocketDenialResponse) as denied:
                    client.websocket_connect(concrete, headers=AS_WALL).__enter__()
                assert denied.value.status_code == 403, path
            else:
                assert answer.status_code == 403, (method, path, answer.status_code, answer.text[:200])
            checked += 1
    assert checked >= 15
    assert client.get("/metrics", headers=AS_WALL).status_code == 403
    assert client.get("/api/stream", params={"token": WALL}).status_code == 403  # the desk's stream: full names
    assert client.get("/api/board/wall", headers=AS_WALL).status_code == 200
    assert client.get("/api/board/wall", headers=AS_READER).status_code == 200  # a desk may open the wall view
    assert client.get("/api/board/wall").status_code == 401
    assert client.get("/api/board/wall", params={"token": WALL}).status_code == 401  # only streams take ?token=


def test_the_wall_shows_initials_and_flags_never_names_or_birth_dates(engine: Engine, mappings: MappingSet) -> None:
    zone = ZoneInfo(host_zone_name())
    now = datetime.now(zone).replace(tzinfo=None)
    start_of_day = now.replace(hour=0, minute=0, second=0)
    late = max(now - timedelta(minutes=40), start_of_day)
    place(engine, mappings, order(1, late))
    place(engine, mappings, order(2, late, name=b"SCHMIDT^KARL", modality=b"MR"))
    with make_client(engine) as client:
        view = client.get("/api/board/wall", headers=AS_WALL).json()
        text = client.get("/api/board/wall", headers=AS_WALL).text
        assert "LLER" not in text and "SCHMIDT" not in text and "1962" not in text and "MRN" not in text
        assert view["privacy"] == "initials" and view["zone"] == zone.key
        assert [c["key"] for c in view["columns"]] == ["CT", "MR"]
        [ct_item] = view["columns"][0]["items"]
        assert ct_item["patient"] == "M.E.A. ·0001"
        assert view["columns"][1]["items"][0]["patient"] == "S.K. ·0002"
        assert ct_item["time"] == f"{late:%H:%M}" and ct_item["start"].startswith(f"{late:%Y-%m-%dT%H:%M}")
        if now - late >= timedelta(minutes=16):  # (after 00:16 only: scheduled today, late by then)
            assert ct_item["flag"]["rule"] == "not_started"
            assert ct_item["flag"]["label"].startswith(f"Late: not started, due {late:%H:%M}")
            assert view["alerts"]["not_started"] == 2 and view["columns"][0]["flagged"] == 1
        assert view["columns"][0]["to_do"] == 1 and view["columns"][0]["done"] == 0
        rooms = client.get("/api/board/wall", params={"group": "room"}, headers=AS_WALL).json()
        assert [c["key"] for c in rooms["columns"]] == ["CT01", "MR01"]  # the mapping assigns the rooms
    with make_client(engine, board_wall_patient="none") as client:
        view = client.get("/api/board/wall", headers=AS_WALL).json()
        assert {i["patient"] for c in view["columns"] for i in c["items"]} == {""}
    with make_client(engine, board_wall_patient="full") as client:
        assert "SCHMIDT, KARL (MRN0000002)" in client.get("/api/board/wall", headers=AS_WALL).text


def test_delays_are_listed_summarized_and_exported(engine: Engine, mappings: MappingSet) -> None:
    zone = ZoneInfo("Pacific/Kiritimati")  # UTC+14: its "today" is rarely the host's
    now = datetime.now(zone).replace(tzinfo=None)
    late = max(now - timedelta(minutes=20), now.replace(hour=0, minute=0, second=0))
    place(engine, mappings, order(1, late))
    place(engine, mappings, order(2, now + timedelta(minutes=1) if now.hour < 23 else late))
    settings = {"timezone": zone.key, "board_start_late_minutes": 0.1}
    with make_client(engine, **settings) as client:
        summary = client.get("/api/board/summary", headers=AS_READER).json()
        assert summary["date"] == now.date().isoformat() and summary["zone"] == zone.key
        assert summary["now"].endswith("+14:00")
        assert summary["total"] == 2 and summary["alerts"]["not_started"] >= 1
        assert summary["by_modality"]["CT"]["to_do"] == 2 and summary["by_modality"]["CT"]["done"] == 0
        found = client.get("/api/board/alerts", headers=AS_READER).json()
        first = found["alerts"][0]
        assert first["accession_number"] == "ACC80001" and first["rule"] == "not_started"
        assert first["label"].startswith(f"Late: not started, due {late:%H:%M}")
        assert first["since"].endswith("+14:00") and first["patient_name"].startswith("M")
        assert client.get("/api/board/alerts", headers=AS_WALL).status_code == 403
        metrics = client.get("/metrics", headers=AS_READER).text
        count = found["counts"]["not_started"]
        assert f'broker_board_delays{{modality="CT",rule="not_started"}} {count:.1f}' in metrics
        assert 'broker_board_delays{modality="",rule="overrunning"} 0.0' in metrics


def test_timeline_causes_are_readable_with_the_uid_apart(client: TestClient, engine: Engine,
                                                        mappings: MappingSet) -> None:
    from broker.domain.procedure_states import ProcedureState
    from broker.domain.procedure_tracker import ProcedureTracker
    from broker.domain.records import Cause

    place(engine, mappings, order(1, datetime.now()))
    uid = "1.2.826.0.1.3680043.10.543.99.1"
    with engine.begin() as db:
        ProcedureTracker().advance(db, 1, ProcedureState.STARTED,
                                   Cause(f"UPS {uid} IN PROGRESS by CT02", event_kind="ups", event_ref=uid))
    history = client.get("/api/board/timeline/1", headers=AS_READER).json()
    assert [e["to"] for e in history["entries"]] == ["SCHEDULED", "STARTED"]
    started = history["entries"][1]
    assert started["text"] == "UPS from CT02: in progress" and uid not in started["text"]
    assert started["ref"] == uid and started["kind"] == "ups"
    assert client.get("/api/board/timeline/999", headers=AS_READER).status_code == 404


def test_reading_the_wall_or_the_alerts_is_a_query_record(engine: Engine, mappings: MappingSet) -> None:
    from broker.audit.events import QUERY
    from tests.integration.test_web_security import Recorder

    place(engine, mappings, order(1, datetime.now(ZoneInfo(host_zone_name())).replace(tzinfo=None)))
    recorder = Recorder()
    settings = load_settings(database_url=engine.url.render_as_string(hide_password=False),
                             api_tokens=f"{READ}:read,{WALL}:wall", mappings_dir=ROOT / "mappings")
    with TestClient(create_app(settings, engine, audit=recorder)) as client:  # type: ignore[arg-type]
        assert client.get("/api/board/wall", headers=AS_WALL).status_code == 200
        assert client.get("/api/board/alerts", headers=AS_READER).status_code == 200
        assert client.get("/api/board/summary", headers=AS_READER).status_code == 200  # counts only: no record
        assert client.get("/api/procedures", headers=AS_WALL).status_code == 403
    wall, alerts, refused = recorder.events
    assert wall.event_id == QUERY and alerts.event_id == QUERY and refused.event_id != QUERY
    assert wall.patient_ids == ("MRN0000001^^^GENHOSP",)
    assert wall.requestor is not None and wall.requestor.user_id.startswith("token wall")
