"""HL7 status to a real test RIS listener: ORC-1 SC with ORC-5 IP then CM, in order, retried while the
RIS is down; through the whole event path of ``broker run`` (relay + in-process worker)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine

from broker.config import load_settings
from broker.events.wiring import EventPath
from broker.hl7.message import parse
from broker.mapping.rules import MappingSet
from broker.outbound.ris_hl7 import build_status_message
from tests.events_support import TestRis, mpps_create, mpps_final, orc, outbox, schedule

pytestmark = pytest.mark.integration


@pytest.fixture
def ris() -> Iterator[TestRis]:
    server = TestRis()
    server.start()
    yield server
    server.close()


def start_path(engine: Engine, database_url: str, ris: TestRis, **extra: object) -> EventPath:
    settings = load_settings(database_url=database_url, redis_url="", ris_hl7_address=f"127.0.0.1:{ris.port}",
                             event_backoff_base=0.05, event_backoff_max=0.2, ris_hl7_ack_timeout=2,
                             event_poll_interval=0.1, **extra)
    return EventPath.start(settings, engine)


def wait_until(condition: object, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_mpps_start_and_completion_reach_the_ris_in_order(engine: Engine, database_url: str, mappings: MappingSet,
                                                          ris: TestRis) -> None:
    order = schedule(engine, mappings)
    path = start_path(engine, database_url, ris)
    try:
        uid = generate_uid()
        started = time.monotonic()
        assert path.workflow.mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01").ok
        assert path.workflow.mpps.update(uid, mpps_final(), "CT01").ok
        messages = ris.wait_for(2)
        assert time.monotonic() - started < 5
    finally:
        path.stop()
    assert [orc(m) for m in messages] == [("SC", "IP"), ("SC", "CM")]
    first = parse(messages[0])
    assert first.value(first.first("MSH"), 9, 1) == "ORM"
    assert first.value(first.first("PID"), 3) == "MRN4711"
    assert first.value(first.first("ORC"), 2) == "PO-77001"
    assert {r.status for r in outbox(engine, "ris.status")} == {"done"}


def test_ris_down_messages_are_retried_and_delivered_in_order(engine: Engine, database_url: str,
                                                              mappings: MappingSet, ris: TestRis) -> None:
    orders = [schedule(engine, mappings, n) for n in (1, 2)]
    ris.refuse = True
    path = start_path(engine, database_url, ris, event_max_attempts=1000)
    try:
        for order in orders:
            uid = generate_uid()
            assert path.workflow.mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01").ok
            assert path.workflow.mpps.update(uid, mpps_final("DISCONTINUED"), "CT01").ok
        heads = [r for r in outbox(engine, "ris.status") if r.payload["order_status"] == "IP"]
        wait_until(lambda: all(r.attempts >= 2 for r in outbox(engine, "ris.status") if r.id in {h.id for h in heads}))
        assert ris.messages == []
        ris.refuse = False
        messages = ris.wait_for(4)
    finally:
        path.stop()
    by_order: dict[str, list[tuple[str, str]]] = {}
    for message in messages:
        parsed = parse(message)
        by_order.setdefault(parsed.value(parsed.first("ORC"), 2), []).append(orc(message))
    assert sorted(by_order) == ["PO-77001", "PO-90002"]
    assert all(statuses == [("SC", "IP"), ("SC", "DC")] for statuses in by_order.values())
    assert {r.status for r in outbox(engine, "ris.status")} == {"done"}


def test_a_negative_ack_is_retried(engine: Engine, database_url: str, mappings: MappingSet, ris: TestRis) -> None:
    order = schedule(engine, mappings)
    ris.ack_code = "AE"
    path = start_path(engine, database_url, ris, event_max_attempts=3)
    try:
        uid = generate_uid()
        path.workflow.mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
        wait_until(lambda: [r.status for r in outbox(engine, "ris.status")] == ["failed"])
    finally:
        path.stop()
    [row] = outbox(engine, "ris.status")
    assert row.attempts == 3 and "AE" in row.last_error


@pytest.mark.parametrize("message_type", ["OMI^O23", "ORU^R01"])
def test_other_message_types(message_type: str) -> None:
    payload = {"at": "20261123094500", "sender": "EPICRIS^GENHOSP", "patient_id": "MRN4711",
               "issuer_of_patient_id": "GENHOSP", "patient_name": "DOE^JANE", "placer_order_number": "PO-1",
               "placer_issuer": "EPICRIS", "filler_order_number": "FO-1", "filler_issuer": "", "order_status": "CM",
               "requested_procedure_id": "RP1", "description": "CT", "accession_number": "ACC1",
               "study_instance_uid": "1.2.3", "sps_id": "SPS1", "modality": "CT"}
    message = parse(build_status_message(payload, message_type, "0b5c5d1e-0000-4000-8000-000000000000"))
    assert message.value(message.msh, 9, 1) + "^" + message.value(message.msh, 9, 2) == message_type
    assert message.value(message.msh, 12) == "2.5.1"
    assert (message.value(message.first("ORC"), 1), message.value(message.first("ORC"), 5)) == ("SC", "CM")
    assert message.value(message.msh, 5) == "EPICRIS"
