"""Reading ``.wl`` files, naming their steps, listing folders and the import's summary (issue 23)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import Dataset
from worklist_file_support import Item, wl_bytes, write_wl

from broker.dicom_json import tag_of, value
from broker.domain.worklist_item import step_item
from broker.worklist_files.folders import is_worklist_name, list_files
from broker.worklist_files.identity import ORDER_ISSUER, derived_study_uid, identity_of, order_number
from broker.worklist_files.importer import Summary
from broker.worklist_files.intake import Outcome
from broker.worklist_files.reading import FileRefused, dataset_json, read_entry


def test_a_file_is_one_order_of_one_step_named_by_study_and_sps_id() -> None:
    entry = read_entry(wl_bytes(Item("S1", accession="ACC-1", study_uid="1.2.3").dataset()), "CT01/s1.wl")
    assert entry.identity == "uid:1.2.3|S1"
    assert (entry.order.placer_order_number, entry.order.placer_issuer) == (order_number("uid:1.2.3|S1"), ORDER_ISSUER)
    [procedure] = entry.order.procedures
    assert (procedure.accession_number, procedure.study_instance_uid, procedure.requested_procedure_id) == \
        ("ACC-1", "1.2.3", "RP-S1")
    [step] = procedure.steps
    assert step.sps_id == "S1" and value(step_item(step.item), "ScheduledStationAETitle") == "CT01"
    assert entry.patient.key.patient_id == "P-S1"
    assert value(entry.patient.attributes, "PatientName") == "DOE^JANE"


def test_the_item_is_the_dataset_without_file_meta_group_lengths_or_private_tags() -> None:
    ds = Item("S1").dataset()
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "LO", "secret")
    item = dataset_json(wl_bytes(ds))
    assert not [t for t in item if t.startswith("0002") or t.endswith("0000") or t.startswith("0009")]
    assert value(item, "RequestedProcedurePriority") == "ROUTINE"


def test_a_file_without_file_meta_in_implicit_vr_is_read() -> None:
    buffer = io.BytesIO()
    ds = Item("S2", charset="ISO_IR 100", name="MÜLLER^ERIKA").dataset()
    ds.save_as(buffer, implicit_vr=True, little_endian=True)  # what old scripts write: a bare dataset
    entry = read_entry(buffer.getvalue(), "s2.wl")
    assert value(entry.patient.attributes, "PatientName") == "MÜLLER^ERIKA"


def test_a_file_without_study_uid_or_sps_id_is_named_by_its_path() -> None:
    ds = Item("").dataset()
    del ds.StudyInstanceUID
    entry = read_entry(wl_bytes(ds), "CT01/x.wl")
    assert entry.identity == "file:CT01/x.wl"
    [procedure] = entry.order.procedures
    assert procedure.study_instance_uid == derived_study_uid("file:CT01/x.wl")  # stable for the file
    assert value(procedure.steps[0].item, "StudyInstanceUID") == procedure.study_instance_uid
    assert identity_of("1.2.3", "", "CT01/y.wl") == "file:CT01/y.wl"  # both are needed
    assert len(procedure.study_instance_uid) <= 64 and derived_study_uid("file:a") != derived_study_uid("file:b")


@pytest.mark.parametrize(("content", "reason", "unreadable"), [
    (b"", "empty file", True),
    (b"MSH|^~\\&|RIS|", "not a readable DICOM file", True),
    (b"\x00" * 200, "not a readable DICOM file", True),
])
def test_what_is_no_dicom_file_is_unreadable(content: bytes, reason: str, unreadable: bool) -> None:
    with pytest.raises(FileRefused) as refused:
        read_entry(content, "x.wl")
    assert refused.value.reason.startswith(reason) and refused.value.unreadable is unreadable


def _without_patient_id() -> Dataset:
    ds = Item("S1").dataset()
    ds.PatientID = ""
    return ds


def _steps(n: int) -> Dataset:
    ds = Item("S1").dataset()
    ds.ScheduledProcedureStepSequence = [Item(f"S{i}").dataset().ScheduledProcedureStepSequence[0] for i in range(n)]
    return ds


@pytest.mark.parametrize(("dataset", "reason"), [
    (_without_patient_id(), "no Patient ID"),
    (_steps(0), "0 Scheduled Procedure Step Sequence items (one is needed)"),
    (_steps(2), "2 Scheduled Procedure Step Sequence items (one is needed)"),
])
def test_a_dicom_file_the_broker_cannot_use_is_refused_but_not_unreadable(dataset: Dataset, reason: str) -> None:
    with pytest.raises(FileRefused) as refused:
        read_entry(wl_bytes(dataset), "x.wl")
    assert (refused.value.reason, refused.value.unreadable) == (reason, False)


def test_order_numbers_fit_and_differ() -> None:
    a, b = order_number("uid:1.2.3|S1"), order_number("uid:1.2.3|S2")
    assert a != b and len(a) <= 64 and a == order_number("uid:1.2.3|S1")
    assert len(identity_of("1." * 40, "S1", "")) <= 200 and len(identity_of("", "", "d/" * 200)) == 200


def test_a_folder_lists_wl_files_in_sub_folders_and_skips_hidden_ones(tmp_path: Path) -> None:
    write_wl(tmp_path / "CT01" / "a.wl", Item("A").dataset())
    write_wl(tmp_path / "b.WL", Item("B").dataset())
    (tmp_path / "CT01" / "lockfile").touch()
    (tmp_path / "CT01" / ".c.wl.tmp").write_bytes(b"being written")
    (tmp_path / ".failed").mkdir()
    (tmp_path / ".failed" / "d.wl").write_bytes(b"moved aside")
    (tmp_path / "notes.txt").write_text("no")
    listed = list_files(tmp_path)
    assert sorted(listed) == ["CT01/a.wl", "b.WL"]
    assert listed["b.WL"].size == (tmp_path / "b.WL").stat().st_size
    assert is_worklist_name("x.wl") and not is_worklist_name(".x.wl") and not is_worklist_name("x.wl.tmp")
    assert list_files(tmp_path / "missing") == {}


def test_the_summary_counts_and_names_the_refused_files() -> None:
    summary = Summary()
    for outcome in (Outcome("a.wl", "created"), Outcome("b.wl", "updated"),
                    Outcome("c.wl", "refused", "", "no Patient ID"), Outcome("d.wl", "unreadable", "", "empty file")):
        summary.add(outcome)
    assert summary.lines() == ["items read: 4", "created: 1", "updated: 1", "unchanged: 0", "refused: 2",
                               "  c.wl: no Patient ID", "  d.wl: empty file"]
    assert summary.lines(dry_run=True)[1] == "would be created: 1"


@pytest.mark.parametrize(("charset", "name"), [("ISO_IR 192", "MÜLLER^ZOË=山田^花子"), ("ISO_IR 100", "GÅRD^ÉLISE")])
def test_names_in_the_files_character_set_are_read_as_text(charset: str, name: str) -> None:
    """ISO_IR 192 (UTF-8) and ISO_IR 100 (Latin-1) files: the item and the patient hold the decoded
    name (the JSON item is text; the worklist SCP encodes it for each modality's character set)."""
    entry = read_entry(wl_bytes(Item("C1", charset=charset, name=name).dataset()), "c1.wl")
    alphabetic, _, ideographic = name.partition("=")
    [person] = entry.patient.attributes[tag_of("PatientName")]["Value"]
    assert person == ({"Alphabetic": alphabetic, "Ideographic": ideographic} if ideographic else {"Alphabetic": name})
    [procedure] = entry.order.procedures
    assert value(procedure.steps[0].item, "SpecificCharacterSet") == charset
