"""The UPS SCP over the wire, on SQLite and PostgreSQL, with pynetdicom as the UPS SCU: N-CREATE,
N-GET, N-SET, N-ACTION 1-5 and C-FIND against the broker's real DICOM server, every status of the
spec section 5 state table (with Error Comment), and the one model behind both views: a UPS
N-CREATE is a worklist item, an HL7 order is a UPS, a UPS claim / completion moves the step and the
procedure, and an MPPS moves the UPS.

The other UPS test modules import the helpers here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepQuery,
    UnifiedProcedureStepWatch,
)
from sqlalchemy import Engine

from broker.config import Settings, load_settings
from broker.dicom.server import DicomServer
from broker.dicom.workflow import build_workflow
from broker.domain.ups_identity import derived_ups_uid
from broker.mapping.rules import MappingSet
from broker.store.tables import ScheduledStep, UpsSubscription
from tests.dicom_support import dicom_server, free_port
from tests.events_support import mpps_create, outbox, procedure_state, rows, schedule, step_status, timeline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GLOBAL = "1.2.840.10008.5.1.4.34.5"
FILTERED_GLOBAL = "1.2.840.10008.5.1.4.34.5.1"
CHANGE_STATE, REQUEST_CANCEL, SUBSCRIBE, UNSUBSCRIBE, SUSPEND = 1, 2, 3, 4, 5


# --- helpers (used by the other UPS test modules too) ------------------------------------------------

def ups_scu(port: int, ae_title: str = "UPSSCU") -> Association:
    """An association to the broker proposing the five UPS SOP classes (and the worklist)."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in (UnifiedProcedureStepPush, UnifiedProcedureStepPull, UnifiedProcedureStepWatch,
                    UnifiedProcedureStepQuery, UnifiedProcedureStepEvent, ModalityWorklistInformationFind,
                    ModalityPerformedProcedureStep):
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title="BROKER")
    assert assoc.is_established
    return assoc


def workitem(label: str = "CT HEAD", state: str = "SCHEDULED", **extra: Any) -> Dataset:
    """An N-CREATE attribute list with the Type 1 attributes of PS3.4 Table CC.2.5-3."""
    ds = Dataset()
    ds.ProcedureStepState = state
    ds.ScheduledProcedureStepPriority = "MEDIUM"
    ds.ProcedureStepLabel = label
    ds.WorklistLabel = "CT01"
    ds.InputReadinessState = "READY"
    ds.ScheduledProcedureStepStartDateTime = "20261201100000"
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "PUPS1"
    ds.IssuerOfPatientID = "CITYMED"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    station = Dataset()
    station.CodeValue = "CT01"
    station.CodingSchemeDesignator = "99LOCAL"
    station.CodeMeaning = "CT scanner 1"
    ds.ScheduledStationNameCodeSequence = [station]
    request = Dataset()
    request.AccessionNumber = "AUPS1"
    request.RequestedProcedureID = "RUPS1"
    request.StudyInstanceUID = str(generate_uid())
    ds.ReferencedRequestSequence = [request]
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def create(assoc: Association, dataset: Dataset, uid: str) -> int:
    status, _ = assoc.send_n_create(dataset, UnifiedProcedureStepPush, uid)
    assert status, "no N-CREATE response"
    return int(status.Status)


def action(assoc: Association, uid: str, action_type: int, **attributes: Any) -> Dataset:
    """N-ACTION with the Push SOP Class UID (the standard's), on whichever UPS context pynetdicom picks.
    (pynetdicom announces a data set for an empty one and sends none: ask with at least one attribute.)"""
    info = Dataset()
    for keyword, value in attributes.items():
        setattr(info, keyword, value)
    status, _ = assoc.send_n_action(info, action_type, UnifiedProcedureStepPush, uid)
    assert status, "no N-ACTION response"
    return status


def change_state(assoc: Association, uid: str, state: str, transaction_uid: str | None) -> int:
    attributes: dict[str, Any] = {"ProcedureStepState": state}
    if transaction_uid is not None:
        attributes["TransactionUID"] = transaction_uid
    return int(action(assoc, uid, CHANGE_STATE, **attributes).Status)


def get(assoc: Association, uid: str, keywords: list[int] | None = None) -> tuple[int, Dataset | None]:
    status, attributes = assoc.send_n_get(keywords or [], UnifiedProcedureStepPush, uid)
    assert status, "no N-GET response"
    return int(status.Status), attributes


def n_set(assoc: Association, uid: str, dataset: Dataset) -> int:
    status, _ = assoc.send_n_set(dataset, UnifiedProcedureStepPush, uid)
    assert status, "no N-SET response"
    return int(status.Status)


def find(assoc: Association, query: Dataset, model: Any = UnifiedProcedureStepPull) -> list[Dataset]:
    found = []
    for status, identifier in assoc.send_c_find(query, model):
        assert status, "no C-FIND response"
        if status.Status == 0xFF00:
            found.append(identifier)
        else:
            assert status.Status == 0x0000, hex(status.Status)
    return found


def final_attributes(transaction_uid: str) -> Dataset:
    """The N-SET that meets the final state requirements for COMPLETED."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    performed = Dataset()
    performed.PerformedProcedureStepStartDateTime = "20261201100500"
    performed.PerformedProcedureStepEndDateTime = "20261201101500"
    ds.UnifiedProcedureStepPerformedProcedureSequence = [performed]
    return ds


def progress(transaction_uid: str, percent: int) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    item = Dataset()
    item.ProcedureStepProgress = percent
    item.ProcedureStepProgressDescription = f"{percent} percent"
    ds.ProcedureStepProgressInformationSequence = [item]
    return ds


def ups_settings(database_url: str, peers: str = "", **extra: Any) -> Settings:
    return load_settings(database_url=database_url, redis_url="", dicom_host="127.0.0.1", dicom_port=free_port(),
                         dicom_peers=peers, **extra)


@pytest.fixture
def broker(engine: Engine, database_url: str) -> Iterator[DicomServer]:
    """The DICOM server with the workflow services and no event path (the outbox only fills)."""
    settings = ups_settings(database_url, "WATCHER@127.0.0.1:9,PERFORMER@127.0.0.1:9")
    with dicom_server(settings, database_url, build_workflow(settings, engine)) as server:
        yield server


@pytest.fixture
def scu(broker: DicomServer) -> Iterator[Association]:
    assoc = ups_scu(broker.port, "PERFORMER")
    yield assoc
    assoc.release()


# --- N-CREATE, N-GET ---------------------------------------------------------------------------------

def test_n_create_makes_a_scheduled_workitem_that_the_worklist_serves_too(engine: Engine,
                                                                          scu: Association) -> None:
    uid = str(generate_uid())
    assert create(scu, workitem(), uid) == 0x0000
    status, ups = get(scu, uid)
    assert status == 0x0000 and ups is not None
    assert ups.ProcedureStepState == "SCHEDULED"
    assert ups.SOPInstanceUID == uid and ups.SOPClassUID == UnifiedProcedureStepPush
    assert ups.ProcedureStepLabel == "CT HEAD" and ups.PatientID == "PUPS1"
    assert ups.ReferencedRequestSequence[0].AccessionNumber == "AUPS1"
    assert "TransactionUID" not in ups
    # The same item is a worklist item (MWL C-FIND), SCHEDULED, with the accession and station.
    query = Dataset()
    query.AccessionNumber = "AUPS1"
    query.PatientID = ""
    sps = Dataset()
    sps.ScheduledStationAETitle = "CT01"
    sps.ScheduledProcedureStepStatus = ""
    sps.ScheduledProcedureStepStartDate = ""
    query.ScheduledProcedureStepSequence = [sps]
    [item] = find(scu, query, ModalityWorklistInformationFind)
    assert item.PatientID == "PUPS1"
    assert item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "SCHEDULED"
    assert item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate == "20261201"
    # N-GET of some attributes only.
    status, some = get(scu, uid, [0x00741000, 0x00100020])
    assert status == 0x0000 and some is not None
    assert set(some.keys()) == {0x00741000, 0x00100020}


def test_n_create_refusals(scu: Association) -> None:
    uid = str(generate_uid())
    assert create(scu, workitem(), uid) == 0x0000
    assert create(scu, workitem(), uid) == 0x0111  # duplicate SOP instance
    assert create(scu, workitem(state="IN PROGRESS"), str(generate_uid())) == 0xC309
    incomplete = workitem()
    del incomplete.ProcedureStepLabel
    assert create(scu, incomplete, str(generate_uid())) == 0x0120
    assert create(scu, workitem(ScheduledProcedureStepPriority="URGENT"), str(generate_uid())) == 0x0106
    assert get(scu, str(generate_uid()))[0] == 0xC307


# --- the state table ---------------------------------------------------------------------------------

def test_state_table_of_a_claimed_workitem(scu: Association) -> None:
    uid, txn = str(generate_uid()), str(generate_uid())
    assert create(scu, workitem(), uid) == 0x0000
    assert change_state(scu, str(generate_uid()), "IN PROGRESS", txn) == 0xC307  # no such UPS
    assert change_state(scu, uid, "COMPLETED", None) == 0xC301  # SCHEDULED, no Transaction UID
    assert change_state(scu, uid, "COMPLETED", txn) == 0xC310  # not yet IN PROGRESS
    assert change_state(scu, uid, "SCHEDULED", None) == 0xC303
    assert n_set(scu, uid, progress(txn, 0)) == 0xC301  # a SCHEDULED UPS has no Transaction UID yet
    assert change_state(scu, uid, "IN PROGRESS", None) == 0x0120  # a claim brings its Transaction UID
    assert change_state(scu, uid, "IN PROGRESS", txn) == 0x0000  # claimed
    assert get(scu, uid)[1].ProcedureStepState == "IN PROGRESS"  # type: ignore[union-attr]
    assert change_state(scu, uid, "IN PROGRESS", str(generate_uid())) == 0xC302
    assert change_state(scu, uid, "COMPLETED", str(generate_uid())) == 0xC301  # wrong Transaction UID
    assert change_state(scu, uid, "COMPLETED", None) == 0xC301
    assert change_state(scu, uid, "SCHEDULED", txn) == 0xC303
    status = action(scu, uid, CHANGE_STATE, ProcedureStepState="COMPLETED", TransactionUID=txn)
    assert status.Status == 0xC304 and "UnifiedProcedureStepPerformedProcedureSequence" in status.ErrorComment
    unlocked = progress(txn, 50)
    del unlocked.TransactionUID
    assert n_set(scu, uid, unlocked) == 0xC301  # IN PROGRESS: only with the Transaction UID
    assert n_set(scu, uid, progress(txn, 50)) == 0x0000
    state_change = final_attributes(txn)
    state_change.ProcedureStepState = "COMPLETED"
    assert n_set(scu, uid, state_change) == 0x0106  # N-SET never changes the state
    assert n_set(scu, uid, final_attributes(txn)) == 0x0000
    assert change_state(scu, uid, "COMPLETED", txn) == 0x0000
    ups = get(scu, uid)[1]
    assert ups is not None and ups.ProcedureStepState == "COMPLETED"
    assert ups.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress == 50
    assert change_state(scu, uid, "COMPLETED", txn) == 0xB306  # warning: already COMPLETED
    assert change_state(scu, uid, "CANCELED", txn) == 0xC300
    assert change_state(scu, uid, "IN PROGRESS", str(generate_uid())) == 0xC300
    assert change_state(scu, uid, "COMPLETED", str(generate_uid())) == 0xC301
    assert change_state(scu, uid, "SCHEDULED", txn) == 0xC303
    assert n_set(scu, uid, progress(txn, 60)) == 0xC300  # final: may no longer be updated
    # Request Cancel of a COMPLETED UPS: C311.
    assert int(action(scu, uid, REQUEST_CANCEL, ReasonForCancellation="no longer needed").Status) == 0xC311
    assert int(action(scu, uid, 9, ReasonForCancellation="x").Status) == 0x0123  # no such action type


def test_state_table_of_canceled_workitems(scu: Association) -> None:
    scheduled, claimed, txn = str(generate_uid()), str(generate_uid()), str(generate_uid())
    assert create(scu, workitem(), scheduled) == 0x0000
    assert create(scu, workitem("CT CHEST"), claimed) == 0x0000
    # Request Cancel of a SCHEDULED UPS cancels it at once.
    assert int(action(scu, scheduled, REQUEST_CANCEL, ReasonForCancellation="patient left").Status) == 0x0000
    ups = get(scu, scheduled)[1]
    assert ups is not None and ups.ProcedureStepState == "CANCELED"
    assert ups.ProcedureStepProgressInformationSequence[0].ReasonForCancellation == "patient left"
    # warning: already CANCELED
    assert int(action(scu, scheduled, REQUEST_CANCEL, ReasonForCancellation="again").Status) == 0xB304
    assert change_state(scu, scheduled, "IN PROGRESS", txn) == 0xC300
    assert change_state(scu, scheduled, "CANCELED", txn) == 0xC301  # canceled unclaimed: no Transaction UID
    assert int(action(scu, str(generate_uid()), REQUEST_CANCEL, ReasonForCancellation="x").Status) == 0xC307
    # IN PROGRESS: the request is passed on (event type 2); the performer cancels with its Transaction UID.
    assert change_state(scu, claimed, "IN PROGRESS", txn) == 0x0000
    assert int(action(scu, claimed, REQUEST_CANCEL, ReasonForCancellation="x").Status) == 0x0000
    assert get(scu, claimed)[1].ProcedureStepState == "IN PROGRESS"  # type: ignore[union-attr]
    assert change_state(scu, claimed, "CANCELED", txn) == 0x0000
    assert change_state(scu, claimed, "CANCELED", txn) == 0xB304
    assert change_state(scu, claimed, "COMPLETED", txn) == 0xC300


# --- C-FIND --------------------------------------------------------------------------------------------

def test_c_find_matches_on_the_ups_keys(scu: Association) -> None:
    first, second = str(generate_uid()), str(generate_uid())
    assert create(scu, workitem("CT HEAD", PatientID="PA", PatientName="DOE^JANE"), first) == 0x0000
    assert create(scu, workitem("MR KNEE", PatientID="PB", PatientName="ROE^RICHARD",
                                ScheduledProcedureStepStartDateTime="20261202080000"), second) == 0x0000
    assert change_state(scu, second, "IN PROGRESS", str(generate_uid())) == 0x0000

    def query(**keys: Any) -> Dataset:
        ds = Dataset()
        ds.SOPInstanceUID = ""
        ds.ProcedureStepState = ""
        ds.PatientName = ""
        ds.ProcedureStepLabel = ""
        ds.ScheduledProcedureStepStartDateTime = ""
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
        return ds

    def uids(ds: Dataset, model: Any = UnifiedProcedureStepPull) -> set[str]:
        return {str(r.SOPInstanceUID) for r in find(scu, ds, model)}

    assert uids(query()) >= {first, second}
    assert uids(query(ProcedureStepState="SCHEDULED")) == {first}
    assert uids(query(ProcedureStepState="IN PROGRESS"), UnifiedProcedureStepWatch) == {second}
    assert uids(query(PatientID="PB"), UnifiedProcedureStepQuery) == {second}
    assert uids(query(PatientName="DOE*")) == {first}
    assert uids(query(ScheduledProcedureStepStartDateTime="20261202-")) == {second}
    assert uids(query(ScheduledProcedureStepStartDateTime="20261201000000-20261201235959")) == {first}
    assert uids(query(SOPInstanceUID=[first, second], ProcedureStepLabel="MR*")) == {second}
    station = Dataset()
    station.CodeValue = "CT01"
    assert uids(query(ScheduledStationNameCodeSequence=[station])) == {first, second}
    station.CodeValue = "MR09"
    assert uids(query(ScheduledStationNameCodeSequence=[station])) == set()
    # Only the return keys come back (plus nothing else), with the stored values.
    [answer] = find(scu, query(PatientID="PA"))
    assert answer.ProcedureStepLabel == "CT HEAD" and answer.ProcedureStepState == "SCHEDULED"
    assert "ReferencedRequestSequence" not in answer and "TransactionUID" not in answer


# --- one model, two views ------------------------------------------------------------------------------

def test_hl7_order_is_a_ups_and_ups_changes_move_the_step_and_the_procedure(
        engine: Engine, mappings: MappingSet, scu: Association) -> None:
    order = schedule(engine, mappings)
    uid = derived_ups_uid(order.study_instance_uid, order.sps_id)
    [step] = rows(engine, ScheduledStep, id=order.step_pk)
    assert step.ups_instance_uid == uid
    query = Dataset()
    query.SOPInstanceUID = ""
    query.ProcedureStepState = "SCHEDULED"
    query.PatientID = ""
    request = Dataset()
    request.AccessionNumber = order.accession_number
    query.ReferencedRequestSequence = [request]
    [found] = find(scu, query)
    assert found.SOPInstanceUID == uid
    txn = str(generate_uid())
    assert change_state(scu, uid, "IN PROGRESS", txn) == 0x0000
    assert step_status(engine, order.step_pk) == "STARTED"
    assert procedure_state(engine, order.procedure_pk) == "STARTED"
    assert n_set(scu, uid, final_attributes(txn)) == 0x0000
    assert change_state(scu, uid, "COMPLETED", txn) == 0x0000
    assert step_status(engine, order.step_pk) == "COMPLETED"
    assert procedure_state(engine, order.procedure_pk) == "COMPLETED"
    assert [t for t in timeline(engine, order.procedure_pk) if t[2] == "ups"] == [
        ("SCHEDULED", "STARTED", "ups"), ("STARTED", "COMPLETED", "ups")]


def test_canceling_a_claimed_ups_discontinues_the_step(engine: Engine, mappings: MappingSet,
                                                       scu: Association) -> None:
    order = schedule(engine, mappings)
    uid, txn = derived_ups_uid(order.study_instance_uid, order.sps_id), str(generate_uid())
    assert change_state(scu, uid, "IN PROGRESS", txn) == 0x0000
    assert change_state(scu, uid, "CANCELED", txn) == 0x0000
    assert step_status(engine, order.step_pk) == "DISCONTINUED"
    assert procedure_state(engine, order.procedure_pk) == "DISCONTINUED"


def test_an_mpps_shows_in_the_ups_state(engine: Engine, mappings: MappingSet, scu: Association) -> None:
    order = schedule(engine, mappings)
    uid = derived_ups_uid(order.study_instance_uid, order.sps_id)
    status, _ = scu.send_n_create(mpps_create(order.study_instance_uid, order.sps_id),
                                  ModalityPerformedProcedureStep, str(generate_uid()))
    assert status.Status == 0x0000
    ups = get(scu, uid)[1]
    assert ups is not None and ups.ProcedureStepState == "IN PROGRESS"
    # Someone else's step: a UPS SCU cannot complete it without the (absent) Transaction UID.
    assert change_state(scu, uid, "COMPLETED", str(generate_uid())) == 0xC301


# --- subscriptions (the events themselves: test_ups_events) ------------------------------------------

def test_subscriptions_are_stored_and_queue_the_initial_state_report(engine: Engine, scu: Association) -> None:
    uid = str(generate_uid())
    assert create(scu, workitem(), uid) == 0x0000
    assert int(action(scu, uid, SUBSCRIBE, ReceivingAE="NOBODY", DeletionLock="FALSE").Status) == 0xC308
    assert int(action(scu, str(generate_uid()), SUBSCRIBE, ReceivingAE="WATCHER",
                      DeletionLock="FALSE").Status) == 0xC307
    assert int(action(scu, uid, SUBSCRIBE, ReceivingAE="WATCHER", DeletionLock="TRUE").Status) == 0x0000
    [subscription] = rows(engine, UpsSubscription)
    assert (subscription.subscriber_ae, subscription.workitem_uid, subscription.deletion_lock) == \
        ("WATCHER", uid, True)
    [report] = outbox(engine, "ups.event")
    assert report.payload["event_type"] == 1 and report.payload["uid"] == uid
    assert report.ordering_key == "ups-subscriber:WATCHER"
    assert int(action(scu, uid, SUSPEND, ReceivingAE="WATCHER").Status) == 0xC314  # not a global one
    assert int(action(scu, GLOBAL, SUBSCRIBE, ReceivingAE="PERFORMER", DeletionLock="FALSE").Status) == 0x0000
    assert int(action(scu, GLOBAL, SUSPEND, ReceivingAE="PERFORMER").Status) == 0x0000
    [suspended] = rows(engine, UpsSubscription, subscriber_ae="PERFORMER")
    assert suspended.suspended_at is not None and suspended.is_global
    assert int(action(scu, uid, UNSUBSCRIBE, ReceivingAE="WATCHER").Status) == 0x0000
    assert int(action(scu, GLOBAL, UNSUBSCRIBE, ReceivingAE="PERFORMER").Status) == 0x0000
    assert rows(engine, UpsSubscription) == []
