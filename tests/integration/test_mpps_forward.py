"""MPPS forwarding (``BROKER_MPPS_FORWARD_AES``) to a real pynetdicom MPPS SCP, on SQLite and PostgreSQL:
the modality talks to the broker's DICOM server over the wire; the forwards run through the event path
of ``broker run`` (relay + in-process worker). N-CREATE and N-SET reach the peer in order; with the
peer down they are retried and arrive once it is up; the modality's own requests succeed regardless.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]
from sqlalchemy import Engine

from broker.config import Settings, load_settings
from broker.events.wiring import EventPath
from broker.mapping.rules import MappingSet
from tests.dicom_support import MppsPeer, dicom_server, free_port, wait_until
from tests.events_support import mpps_create, mpps_final, mpps_row, outbox, schedule

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def peer() -> Iterator[MppsPeer]:
    target = MppsPeer()
    yield target
    target.stop()


def settings_for(database_url: str, peer: MppsPeer) -> Settings:
    return load_settings(database_url=database_url, redis_url="", dicom_host="127.0.0.1", dicom_port=free_port(),
                         dicom_peers=peer.peer_setting(), mpps_forward_aes=peer.ae_title, event_max_attempts=1000,
                         event_backoff_base=0.05, event_backoff_max=0.3, event_poll_interval=0.1,
                         dicom_dimse_timeout=5)


def perform(port: int, study_uid: str, sps_id: str) -> tuple[str, list[int]]:
    """A modality's N-CREATE IN PROGRESS and N-SET COMPLETED; returns the MPPS UID and both statuses."""
    ae = AE(ae_title="CT01")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="BROKER")
    assert assoc.is_established
    uid = generate_uid()
    try:
        created, _ = assoc.send_n_create(mpps_create(study_uid, sps_id), ModalityPerformedProcedureStep, uid)
        completed, _ = assoc.send_n_set(mpps_final("COMPLETED"), ModalityPerformedProcedureStep, uid)
    finally:
        assoc.release()
    return uid, [int(created.Status), int(completed.Status)]


def test_create_and_set_arrive_in_order(engine: Engine, database_url: str, mappings: MappingSet,
                                        peer: MppsPeer) -> None:
    peer.start()
    order = schedule(engine, mappings)
    settings = settings_for(database_url, peer)
    path = EventPath.start(settings, engine)
    try:
        with dicom_server(settings, database_url, path.workflow) as server:
            uid, statuses = perform(server.port, order.study_instance_uid, order.sps_id)
            assert statuses == [0x0000, 0x0000]
            wait_until(lambda: len(peer.received) >= 2, what="both forwards")
    finally:
        path.stop()
    assert [(op, sop) for op, sop, _ in peer.received] == [("N-CREATE", uid), ("N-SET", uid)]
    created, completed = peer.received[0][2], peer.received[1][2]
    assert created.PerformedProcedureStepStatus == "IN PROGRESS"
    assert created.ScheduledStepAttributesSequence[0].StudyInstanceUID == order.study_instance_uid
    assert completed.PerformedProcedureStepStatus == "COMPLETED"
    assert len(completed.PerformedSeriesSequence) == 1
    assert [e.status for e in outbox(engine, "mpps.forward")] == ["done", "done"]


def test_peer_down_is_retried_and_the_modality_never_notices(engine: Engine, database_url: str,
                                                            mappings: MappingSet, peer: MppsPeer) -> None:
    order = schedule(engine, mappings)
    settings = settings_for(database_url, peer)  # the peer's port: nothing listens yet
    path = EventPath.start(settings, engine)
    try:
        with dicom_server(settings, database_url, path.workflow) as server:
            uid, statuses = perform(server.port, order.study_instance_uid, order.sps_id)
            assert statuses == [0x0000, 0x0000]  # the broker answers for itself, not for the peer
            assert mpps_row(engine, uid).status == "COMPLETED"
            wait_until(lambda: any(e.attempts >= 2 for e in outbox(engine, "mpps.forward")), what="retries")
            head, follower = outbox(engine, "mpps.forward")
            assert "no association" in head.last_error
            assert follower.status == "pending" and follower.attempts == 0  # waits behind its N-CREATE
            assert peer.received == []
            peer.start()
            wait_until(lambda: len(peer.received) >= 2, what="both forwards after the peer came up")
    finally:
        path.stop()
    assert [(op, sop) for op, sop, _ in peer.received] == [("N-CREATE", uid), ("N-SET", uid)]
    assert [e.status for e in outbox(engine, "mpps.forward")] == ["done", "done"]
