"""UPS attribute matching (C-FIND and filtered global subscriptions) on DICOM JSON, and the UPS view
of a worklist item."""

from __future__ import annotations

import uuid

from pydicom import Dataset

from broker.domain import ups_matching as matching
from broker.domain.ups_identity import NAMESPACE, derived_ups_uid
from broker.domain.ups_view import workitem


def ds_json(**keys: object) -> dict:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds.to_json_dict()


STORED = ds_json(PatientName="DOE^JANE", PatientID="P1", ProcedureStepState="SCHEDULED",
                 ScheduledProcedureStepStartDateTime="20261201093000", SOPInstanceUID="1.2.3",
                 ScheduledStationNameCodeSequence=[Dataset()])
STORED["00404025"]["Value"] = [ds_json(CodeValue="CT01", CodingSchemeDesignator="99LOCAL")]


def matches(**keys: object) -> bool:
    return matching.dataset_matches(ds_json(**keys), STORED)


def test_single_wildcard_range_uid_list_universal_and_sequence() -> None:
    assert matches(PatientID="P1") and not matches(PatientID="P2") and not matches(PatientID="p1")
    assert matches(PatientName="DOE*") and matches(PatientName="D?E^JANE") and not matches(PatientName="ROE*")
    assert matches(PatientName="") and matches(PatientName="*")  # universal
    assert matches(ScheduledProcedureStepStartDateTime="20261201-20261201235959")
    assert matches(ScheduledProcedureStepStartDateTime="-20261201") and not matches(
        ScheduledProcedureStepStartDateTime="20261202-")
    assert matches(SOPInstanceUID=["1.2.4", "1.2.3"]) and not matches(SOPInstanceUID="1.2.4")
    code = Dataset()
    code.CodeValue = "CT01"
    assert matches(ScheduledStationNameCodeSequence=[code])
    code.CodeValue = "MR01"
    assert not matches(ScheduledStationNameCodeSequence=[code])
    assert not matches(AdmissionID="X")  # a stored empty value matches only universal keys


def test_selected_returns_only_the_keys_asked_for() -> None:
    query = ds_json(PatientID="", ProcedureStepState="", AccessionNumber="")
    assert set(matching.selected(query, STORED)) == {"00100020", "00741000", "00080050"}
    assert matching.selected(query, STORED)["00080050"] == {"vr": "SH"}


def test_hl7_step_uid_is_stable_and_the_migration_derives_the_same() -> None:
    uid = derived_ups_uid("1.2.840.1", "SPS1")
    assert uid == derived_ups_uid("1.2.840.1", "SPS1") != derived_ups_uid("1.2.840.1", "SPS2")
    assert uid.startswith("2.25.") and len(uid) <= 64
    import importlib

    migration = importlib.import_module("broker.store.migrations.versions.0004_unified_procedure_step")
    assert migration._NAMESPACE == NAMESPACE == uuid.UUID("5b0d43a4-7d1f-4f56-9a55-3c2f6c0a2b1e")
    assert migration._derived("1.2.840.1", "SPS1") == uid


def test_the_ups_view_of_a_worklist_item() -> None:
    sps = ds_json(ScheduledStationAETitle="CT01", ScheduledProcedureStepStartDate="20261201",
                  ScheduledProcedureStepStartTime="093000", ScheduledProcedureStepDescription="CT HEAD",
                  ScheduledProcedureStepID="S1")
    item = ds_json(PatientName="DOE^JANE", PatientID="P1", AccessionNumber="A1", StudyInstanceUID="1.2.9",
                   RequestedProcedurePriority="STAT")
    item["00400100"] = {"vr": "SQ", "Value": [sps]}
    ups = Dataset.from_json(workitem("1.2.3", item, "ARRIVED", None))
    assert ups.ProcedureStepState == "SCHEDULED"
    assert ups.ScheduledProcedureStepStartDateTime == "20261201093000"
    assert ups.ScheduledProcedureStepPriority == "HIGH" and ups.ProcedureStepLabel == "CT HEAD"
    assert ups.ScheduledStationNameCodeSequence[0].CodeValue == "CT01"
    assert ups.ReferencedRequestSequence[0].AccessionNumber == "A1"
    assert ups.SOPInstanceUID == "1.2.3" and ups.PatientName == "DOE^JANE"
    overlaid = Dataset.from_json(workitem("1.2.3", item, "STARTED", ds_json(ProcedureStepLabel="UPS LABEL",
                                                                         PatientName="OLD^NAME")))
    assert overlaid.ProcedureStepLabel == "UPS LABEL" and overlaid.ProcedureStepState == "IN PROGRESS"
    assert overlaid.PatientName == "DOE^JANE"  # the patient is always the item's (ADT updates)
