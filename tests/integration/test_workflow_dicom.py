"""The procedure status pipeline over the wire, on SQLite and PostgreSQL: pynetdicom as the modality,
the archive and the RIS's counterpart against the broker's real DICOM server, HL7 listener and event
path (relay + in-process worker, so no Redis).

Happy path: HL7 order over MLLP -> C-FIND finds it -> MPPS N-CREATE IN PROGRESS (linked through the
Scheduled Step Attribute Sequence) -> the item leaves the worklist -> N-SET COMPLETED -> commitment
N-ACTION to the archive -> IAN from the archive -> the archive's report -> ARCHIVED, with the timeline
in order and ORC-1 SC / ORC-5 IP then CM at the test RIS. Bad input: the status codes of spec section
4 and 6 on the wire (with Error Comment, Error ID, Offending Element) and nothing stored wrongly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, Association, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    InstanceAvailabilityNotification,
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
)
from sqlalchemy import Engine

from broker.config import Settings, load_settings
from broker.dicom.server import DicomServer
from broker.dicom.workflow import build_workflow
from broker.events.wiring import EventPath
from broker.hl7.mllp import MLLPServer, run_in_thread
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.store.tables import IanNotification, RequestedProcedure
from tests.dicom_support import StgCmtArchive, dicom_server, free_port, wait_until
from tests.events_support import (
    TestRis,
    commitment,
    ian,
    mpps_create,
    mpps_final,
    mpps_row,
    orc,
    outbox,
    procedure_state,
    rows,
    schedule,
    step_status,
    timeline,
)
from tests.mwl_support import Order, send

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ORDER = Order("WF1", "CT01", "CT", start="20261123093000", name="DOE^JANE")


@pytest.fixture
def ris() -> Iterator[TestRis]:
    server = TestRis()
    server.start()
    yield server
    server.close()


def modality(port: int, ae_title: str = "CT01", commands: list[Dataset] | None = None) -> Association:
    """An association to the broker; ``commands`` collects the command set of every message received
    (pynetdicom's N-CREATE / N-SET status keeps only Error Comment and Error ID, not Offending Element)."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in (ModalityWorklistInformationFind, ModalityPerformedProcedureStep,
                    InstanceAvailabilityNotification):
        ae.add_requested_context(context)
    handlers: list[Any] = [] if commands is None else [
        (evt.EVT_DIMSE_RECV, lambda event: commands.append(event.message.command_set))]
    assoc = ae.associate("127.0.0.1", port, ae_title="BROKER", evt_handlers=handlers)
    assert assoc.is_established
    return assoc


def worklist(assoc: Association, station: str = "CT01") -> list[Dataset]:
    query = Dataset()
    for keyword in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", "RequestedProcedureID"):
        setattr(query, keyword, "")
    sps = Dataset()
    sps.ScheduledStationAETitle = station
    sps.ScheduledProcedureStepID = ""
    sps.Modality = ""
    query.ScheduledProcedureStepSequence = [sps]
    found = []
    for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
        assert status, "no C-FIND response"
        if status.Status in (0xFF00, 0xFF01) and identifier is not None:
            found.append(identifier)
    return found


def n_create(assoc: Association, dataset: Dataset, uid: str, sop_class: Any = ModalityPerformedProcedureStep
             ) -> Dataset:
    status, _ = assoc.send_n_create(dataset, sop_class, uid)
    assert status, "no N-CREATE response"
    return status


def n_set(assoc: Association, dataset: Dataset, uid: str) -> Dataset:
    status, _ = assoc.send_n_set(dataset, ModalityPerformedProcedureStep, uid)
    assert status, "no N-SET response"
    return status


def test_order_to_archived_over_the_wire(engine: Engine, database_url: str, mappings: MappingSet,
                                         ris: TestRis) -> None:
    archive = StgCmtArchive(mode="new").start()
    settings = load_settings(
        database_url=database_url, redis_url="", dicom_host="127.0.0.1", dicom_port=free_port(),
        dicom_peers=archive.peer_setting(), stgcmt_archive_ae="ARCHIVE", stgcmt_report_wait=0.3,
        ris_hl7_address=f"127.0.0.1:{ris.port}", event_backoff_base=0.05, event_backoff_max=0.2,
        event_poll_interval=0.1)
    hl7 = run_in_thread(MLLPServer(Intake(engine, mappings), host="127.0.0.1", port=0, workers=2))
    path = EventPath.start(settings, engine)
    try:
        send(hl7.port, ORDER)  # the RIS's order, over MLLP, answered AA
        with dicom_server(settings, database_url, path.workflow) as server:
            assoc = modality(server.port)
            try:
                [item] = worklist(assoc)
                study_uid = str(item.StudyInstanceUID)
                sps_id = str(item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID)
                assert sps_id == "WF1"
                [procedure] = rows(engine, RequestedProcedure, study_instance_uid=study_uid)
                mpps_uid, images = generate_uid(), [str(generate_uid()), str(generate_uid())]
                started = n_create(assoc, mpps_create(study_uid, sps_id, PatientID=item.PatientID,
                                                      PatientName=item.PatientName), mpps_uid)
                assert started.Status == 0x0000
                assert mpps_row(engine, mpps_uid).step_fk is not None
                assert worklist(assoc) == []  # STARTED is hidden from the worklist
                assert n_set(assoc, mpps_final("COMPLETED", images), mpps_uid).Status == 0x0000
            finally:
                assoc.release()
            # The commitment request reaches the archive, which answers it later.
            wait_until(lambda: archive.actions and archive.released, what="the commitment N-ACTION")
            [action] = archive.actions
            assert sorted(i for _, i in action.referenced) == sorted(images)
            # The archive's IAN for the same instances (no second commitment request for them).
            notifier = modality(server.port, "ARCHIVE")
            try:
                status = n_create(notifier, ian(study_uid, mpps_uid, images), generate_uid(),
                                  InstanceAvailabilityNotification)
                assert status.Status == 0x0000
            finally:
                notifier.release()
            assert procedure_state(engine, procedure.id) == "IMAGES AVAILABLE"
            assert archive.report_on_new_association(server.port, "BROKER", action) == 0x0000
            wait_until(lambda: procedure_state(engine, procedure.id) == "ARCHIVED", what="ARCHIVED")
        messages = ris.wait_for(2)
    finally:
        path.stop()
        hl7.stop()
        archive.stop()
    assert [t for t in timeline(engine, procedure.id) if t[2] != "hl7"] == [
        ("SCHEDULED", "STARTED", "mpps"), ("STARTED", "COMPLETED", "mpps"),
        ("COMPLETED", "IMAGES AVAILABLE", "ian"), ("IMAGES AVAILABLE", "ARCHIVED", "stgcmt")]
    assert [orc(m) for m in messages] == [("SC", "IP"), ("SC", "CM")]
    assert all("|PLWF1^CERNER|" in m for m in messages)
    [(request, items)] = commitment(engine)
    assert request.status == "COMMITTED" and all(i.committed for i in items)
    assert {e.status for e in outbox(engine)} == {"done"}


# --- bad input over the wire ------------------------------------------------------------------------

@pytest.fixture
def broker(engine: Engine, database_url: str) -> Iterator[tuple[DicomServer, Settings]]:
    """The DICOM server with the workflow services (no event path: the outbox just fills)."""
    settings = load_settings(database_url=database_url, dicom_host="127.0.0.1", dicom_port=free_port(),
                             ris_hl7_address="127.0.0.1:9", dicom_peers="ARCHIVE@127.0.0.1:9",
                             stgcmt_archive_ae="ARCHIVE")
    with dicom_server(settings, database_url, build_workflow(settings, engine)) as server:
        yield server, settings


def test_mpps_bad_input_gets_the_right_status(engine: Engine, mappings: MappingSet,
                                              broker: tuple[DicomServer, Settings]) -> None:
    server, _ = broker
    order = schedule(engine, mappings)
    commands: list[Dataset] = []
    assoc = modality(server.port, commands=commands)
    try:
        # Type 1 attributes missing: 0x0120 with their tags as Offending Element.
        incomplete = mpps_create(order.study_instance_uid, order.sps_id)
        del incomplete.PerformedStationAETitle
        del incomplete.Modality
        status = n_create(assoc, incomplete, generate_uid())
        assert status.Status == 0x0120
        assert "Modality" in status.ErrorComment
        assert set(commands[-1].OffendingElement) == {0x00400241, 0x00080060}
        # N-CREATE with PPS Status COMPLETED: 0x0106 naming Performed Procedure Step Status.
        status = n_create(assoc, mpps_create(order.study_instance_uid, order.sps_id, status="COMPLETED"),
                          generate_uid())
        assert status.Status == 0x0106 and commands[-1].OffendingElement == 0x00400252
        assert step_status(engine, order.step_pk) == "SCHEDULED" and outbox(engine) == []
        # A good one, then the same SOP Instance again: 0x0111.
        uid = generate_uid()
        assert n_create(assoc, mpps_create(order.study_instance_uid, order.sps_id), uid).Status == 0x0000
        assert n_create(assoc, mpps_create(order.study_instance_uid, order.sps_id), uid).Status == 0x0111
        # Completed, then an N-SET after COMPLETED: 0x0110, Error ID A710, the standard's comment.
        assert n_set(assoc, mpps_final("COMPLETED"), uid).Status == 0x0000
        before = len(outbox(engine))
        late = Dataset()
        late.PerformedProcedureStepDescription = "too late"
        status = n_set(assoc, late, uid)
        assert status.Status == 0x0110
        assert status.ErrorComment == "Performed Procedure Step Object may no longer be updated"
        assert status.ErrorID == 0xA710
        assert len(outbox(engine)) == before
        assert "too late" not in str(mpps_row(engine, uid).dataset)
        # N-SET on an instance the broker does not have: 0x0112.
        assert n_set(assoc, mpps_final("COMPLETED"), generate_uid()).Status == 0x0112
    finally:
        assoc.release()
    assert mpps_row(engine, uid).status == "COMPLETED"
    assert procedure_state(engine, order.procedure_pk) == "COMPLETED"


def test_unknown_study_ian_and_unscheduled_mpps_are_accepted_and_kept_apart(
        engine: Engine, mappings: MappingSet, broker: tuple[DicomServer, Settings]) -> None:
    server, _ = broker
    order = schedule(engine, mappings)
    before = timeline(engine, order.procedure_pk)
    assoc = modality(server.port)
    try:
        # An IAN for a study nobody scheduled: accepted (PS3.4 R has no failure for it), no procedure.
        ian_uid = generate_uid()
        status = n_create(assoc, ian("1.2.826.0.1.3680043.10.543.999", None, [generate_uid()]), ian_uid,
                          InstanceAvailabilityNotification)
        assert status.Status == 0x0000
        [stored] = rows(engine, IanNotification, sop_instance_uid=ian_uid)
        assert stored.procedure_fk is None
        # An MPPS whose Scheduled Step Attribute Sequence matches no step: kept unscheduled, success.
        uid = generate_uid()
        assert n_create(assoc, mpps_create("1.2.826.0.1.3680043.10.543.998", "NOSUCH"), uid).Status == 0x0000
        assert n_set(assoc, mpps_final("COMPLETED"), uid).Status == 0x0000
    finally:
        assoc.release()
    row = mpps_row(engine, uid)
    assert (row.unscheduled, row.step_fk, row.procedure_fk, row.status) == (True, None, None, "COMPLETED")
    assert timeline(engine, order.procedure_pk) == before
    assert procedure_state(engine, order.procedure_pk) == "SCHEDULED"
    assert commitment(engine) == [] and outbox(engine, "ris.status") == []
