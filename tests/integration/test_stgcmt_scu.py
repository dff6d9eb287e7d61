"""Storage Commitment Push Model as SCU toward a real pynetdicom archive (spec section 6), on SQLite and
PostgreSQL, through the event path of ``broker run`` (relay + in-process worker):

the N-ACTION's content; the report on the request's own association (role selection) and on a new
association the archive opens to the broker's DICOM server; failures per instance; an archive that
never answers (the timeout sweep of ``broker run``); a refused N-ACTION retried; no association.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine

from broker.config import Settings, load_settings
from broker.events.wiring import EventPath
from broker.mapping.rules import MappingSet
from tests.dicom_support import (
    STGCMT_INSTANCE,
    StgCmtArchive,
    dicom_server,
    free_port,
    report_dataset,
    wait_until,
)
from tests.events_support import (
    CT_IMAGE,
    Scheduled,
    commitment,
    mpps_create,
    mpps_final,
    outbox,
    procedure_state,
    schedule,
    timeline,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def settings_for(database_url: str, archive: StgCmtArchive, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url, "redis_url": "", "dicom_host": "127.0.0.1", "dicom_port": free_port(),
        "dicom_peers": archive.peer_setting(), "stgcmt_archive_ae": archive.ae_title,
        "stgcmt_report_wait": 5, "event_backoff_base": 0.05, "event_backoff_max": 0.2,
        "event_poll_interval": 0.1, "dicom_dimse_timeout": 5}
    values.update(extra)
    return load_settings(**values)


@pytest.fixture
def archives() -> Iterator[list[StgCmtArchive]]:
    started: list[StgCmtArchive] = []
    yield started
    for archive in started:
        archive.stop()


def complete_procedure(path: EventPath, order: Scheduled, images: list[str]) -> None:
    """The modality's MPPS: IN PROGRESS, then COMPLETED with ``images`` (which asks for commitment)."""
    uid = generate_uid()
    assert path.workflow.mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01").ok
    assert path.workflow.mpps.update(uid, mpps_final("COMPLETED", images), "CT01").ok


def request_status(engine: Engine) -> str:
    [(request, _)] = commitment(engine)
    return str(request.status)


def test_report_on_the_request_association_archives(engine: Engine, database_url: str, mappings: MappingSet,
                                                    archives: list[StgCmtArchive]) -> None:
    archive = StgCmtArchive(mode="same").start()
    archives.append(archive)
    order = schedule(engine, mappings)
    images = [str(generate_uid()), str(generate_uid())]
    path = EventPath.start(settings_for(database_url, archive), engine)
    try:
        complete_procedure(path, order, images)
        wait_until(lambda: procedure_state(engine, order.procedure_pk) == "ARCHIVED", what="ARCHIVED")
        wait_until(lambda: archive.released, what="the broker's release")
    finally:
        path.stop()
    [action] = archive.actions
    [(request, items)] = commitment(engine)
    # The N-ACTION: action type 1 on the well-known instance, the request's Transaction UID, every image.
    assert (action.action_type, action.requested_instance, action.calling_ae) == (1, STGCMT_INSTANCE, "BROKER")
    assert action.transaction_uid == request.transaction_uid
    assert sorted(action.referenced) == sorted((CT_IMAGE, i) for i in images)
    # The report came on that association, was answered 0x0000, and the broker then released it.
    assert archive.report_statuses == [("same", 0x0000)]
    assert archive.released == [action.association]
    assert request.status == "COMMITTED" and all(i.committed is True for i in items)
    assert timeline(engine, order.procedure_pk)[-1] == ("COMPLETED", "ARCHIVED", "stgcmt")
    assert [e.status for e in outbox(engine, "stgcmt.request")] == ["done"]


def test_report_on_a_new_association_archives(engine: Engine, database_url: str, mappings: MappingSet,
                                             archives: list[StgCmtArchive]) -> None:
    archive = StgCmtArchive(mode="new").start()
    archives.append(archive)
    order = schedule(engine, mappings)
    images = [str(generate_uid())]
    settings = settings_for(database_url, archive, stgcmt_report_wait=0.3)
    path = EventPath.start(settings, engine)
    try:
        with dicom_server(settings, database_url, path.workflow) as server:
            complete_procedure(path, order, images)
            # The broker waits a moment for a report on its association, then releases it.
            wait_until(lambda: archive.released, what="the broker's release")
            assert request_status(engine) == "PENDING"
            assert procedure_state(engine, order.procedure_pk) == "COMPLETED"
            [action] = archive.actions
            assert archive.report_on_new_association(server.port, settings.ae_title, action) == 0x0000
            wait_until(lambda: procedure_state(engine, order.procedure_pk) == "ARCHIVED", what="ARCHIVED")
    finally:
        path.stop()
    [(request, items)] = commitment(engine)
    assert request.status == "COMMITTED" and [i.committed for i in items] == [True]
    assert archive.report_statuses == [("new", 0x0000)]


def test_failed_instances_make_commit_failed_with_their_reason(engine: Engine, database_url: str,
                                                               mappings: MappingSet,
                                                               archives: list[StgCmtArchive]) -> None:
    images = [str(generate_uid()), str(generate_uid())]
    archive = StgCmtArchive(mode="same", fail={images[1]: 0x0112}).start()
    archives.append(archive)
    order = schedule(engine, mappings)
    path = EventPath.start(settings_for(database_url, archive), engine)
    try:
        complete_procedure(path, order, images)
        wait_until(lambda: procedure_state(engine, order.procedure_pk) == "COMMIT FAILED", what="COMMIT FAILED")
    finally:
        path.stop()
    [(request, items)] = commitment(engine)
    assert request.status == "FAILED" and "1 instance" in request.reason
    assert {i.sop_instance_uid: (i.committed, i.failure_reason) for i in items} == {
        images[0]: (True, None), images[1]: (False, 0x0112)}
    assert archive.report_statuses == [("same", 0x0000)]
    assert timeline(engine, order.procedure_pk)[-1] == ("COMPLETED", "COMMIT FAILED", "stgcmt")


def test_a_report_on_a_new_association_with_failures(engine: Engine, database_url: str, mappings: MappingSet,
                                                     archives: list[StgCmtArchive]) -> None:
    images = [str(generate_uid())]
    archive = StgCmtArchive(mode="new", fail={images[0]: 0x0112}).start()
    archives.append(archive)
    order = schedule(engine, mappings)
    settings = settings_for(database_url, archive, stgcmt_report_wait=0)
    path = EventPath.start(settings, engine)
    try:
        with dicom_server(settings, database_url, path.workflow) as server:
            complete_procedure(path, order, images)
            wait_until(lambda: archive.actions, what="the N-ACTION")
            assert archive.report_on_new_association(server.port, settings.ae_title, archive.actions[0]) == 0
            # An unknown Transaction UID is refused (0x0115) and changes nothing; a wrong event type 0x0113.
            event_type, info = report_dataset(generate_uid(), [(CT_IMAGE, images[0])])
            assert archive.send_report(server.port, settings.ae_title, event_type, info) == 0x0115
            assert archive.send_report(server.port, settings.ae_title, 7, info) == 0x0113
    finally:
        path.stop()
    assert procedure_state(engine, order.procedure_pk) == "COMMIT FAILED"
    [(request, [item])] = commitment(engine)
    assert (request.status, item.committed, item.failure_reason) == ("FAILED", False, 0x0112)


def test_no_answer_fails_the_request_after_the_timeout(engine: Engine, database_url: str, mappings: MappingSet,
                                                       archives: list[StgCmtArchive]) -> None:
    archive = StgCmtArchive(mode="silent").start()
    archives.append(archive)
    order = schedule(engine, mappings)
    path = EventPath.start(settings_for(database_url, archive, stgcmt_timeout=1, stgcmt_report_wait=0.2), engine)
    try:
        complete_procedure(path, order, [str(generate_uid())])
        wait_until(lambda: archive.released, what="the broker's release")
        # The relay's sweep (every min(30 s, stgcmt_timeout)) fails the request once it is overdue.
        wait_until(lambda: procedure_state(engine, order.procedure_pk) == "COMMIT FAILED", seconds=15,
                   what="COMMIT FAILED")
    finally:
        path.stop()
    [(request, [item])] = commitment(engine)
    assert (request.status, request.reason) == ("FAILED", "no answer within 1 s")
    assert item.committed is None
    assert archive.report_statuses == []
    [event] = outbox(engine, "stgcmt.request")
    assert event.status == "done"  # the request was delivered; only the answer is missing


def test_a_refused_n_action_is_retried(engine: Engine, database_url: str, mappings: MappingSet,
                                       archives: list[StgCmtArchive]) -> None:
    archive = StgCmtArchive(mode="same", action_statuses=[0x0213]).start()  # resource limitation once
    archives.append(archive)
    order = schedule(engine, mappings)
    path = EventPath.start(settings_for(database_url, archive), engine)
    try:
        complete_procedure(path, order, [str(generate_uid())])
        wait_until(lambda: procedure_state(engine, order.procedure_pk) == "ARCHIVED", what="ARCHIVED")
    finally:
        path.stop()
    assert len(archive.actions) == 2
    assert archive.actions[0].transaction_uid == archive.actions[1].transaction_uid
    assert [e.status for e in outbox(engine, "stgcmt.request")] == ["done"]


def test_archive_down_is_retried_until_it_is_up(engine: Engine, database_url: str, mappings: MappingSet,
                                               archives: list[StgCmtArchive]) -> None:
    archive = StgCmtArchive(mode="same")  # not started: nothing listens on its port
    archives.append(archive)
    order = schedule(engine, mappings)
    path = EventPath.start(settings_for(database_url, archive, event_max_attempts=1000), engine)
    try:
        complete_procedure(path, order, [str(generate_uid())])
        wait_until(lambda: any(r.attempts >= 2 for r in outbox(engine, "stgcmt.request")), what="retries")
        assert "no association" in outbox(engine, "stgcmt.request")[0].last_error
        archive.start()
        wait_until(lambda: procedure_state(engine, order.procedure_pk) == "ARCHIVED", what="ARCHIVED")
    finally:
        path.stop()
    assert len(archive.actions) == 1
    assert [e.status for e in outbox(engine, "stgcmt.request")] == ["done"]
