"""Reading one ``.wl`` file: DICOM (with or without a File Meta header) into the records of a domain
command, or a refusal that says why.

The item the modalities see is the file's dataset as DICOM JSON, minus the File Meta group and group
lengths; the broker adds SPS Status (its own status handling: SCHEDULED for a new step) and, for a file
without one, a derived Study Instance UID. A file must hold a Patient ID (the broker keeps patients by
it) and exactly one Scheduled Procedure Step Sequence item (one file, one step).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from broker.dicom_json import JsonDataset, element, tag_of, value
from broker.domain.records import OrderRecord, PatientKey, PatientRecord, ProcedureRecord, StepRecord
from broker.domain.worklist_item import SPS_SEQUENCE
from broker.worklist_files.identity import ORDER_ISSUER, derived_study_uid, identity_of, order_number

PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
"""The attributes of a file that belong to the patient record (the rest stay the step's item)."""


class FileRefused(Exception):
    """The file cannot become a step; ``reason`` is one line for the operator (no patient data).
    ``unreadable``: it is no DICOM file at all (moved aside), else a DICOM file the broker cannot use
    as it is (left in place, read again once it changes)."""

    def __init__(self, reason: str, *, unreadable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreadable = unreadable


@dataclass(frozen=True)
class WorklistEntry:
    """What one file asks for: its step's identity and the records of the domain command."""

    identity: str
    patient: PatientRecord
    order: OrderRecord


def dataset_json(data: bytes) -> JsonDataset:
    """The file's dataset as DICOM JSON (no File Meta, no group lengths); raises FileRefused."""
    if not data:
        raise FileRefused("empty file", unreadable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd values; the checks below decide
            dataset = dcmread(io.BytesIO(data), force=True)
            result = dataset.to_json_dict(bulk_data_threshold=1 << 30)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError,
            NotImplementedError) as exc:
        raise FileRefused(f"not a readable DICOM file ({type(exc).__name__})", unreadable=True) from exc
    result = _public(result)
    if not result:
        raise FileRefused("not a readable DICOM file (no data elements)", unreadable=True)
    return result


def _public(dataset: JsonDataset) -> JsonDataset:
    """The standard elements: no File Meta group, group lengths or private elements (odd groups), at
    any depth (pydicom's remove_private_tags walks the dataset and cost half the reading time)."""
    kept: JsonDataset = {}
    for tag, elem in dataset.items():
        if tag.startswith("0002") or tag.endswith("0000") or int(tag[3], 16) % 2:
            continue
        if elem.get("vr") == "SQ" and elem.get("Value"):
            elem = {**elem, "Value": [_public(item) for item in elem["Value"]]}
        kept[tag] = elem
    return kept


def read_entry(data: bytes, relative_path: str, folder: str = "") -> WorklistEntry:
    """The entry of a file's bytes; ``relative_path`` (inside its ``folder``) names it when it has no
    Study Instance UID and SPS ID. Raises FileRefused."""
    item = dataset_json(data)
    sequence = item.get(SPS_SEQUENCE, {}).get("Value") or []
    if len(sequence) != 1:
        raise FileRefused(f"{len(sequence)} Scheduled Procedure Step Sequence items (one is needed)")
    patient_id = value(item, "PatientID")
    if not patient_id:
        raise FileRefused("no Patient ID")
    study_uid = value(item, "StudyInstanceUID")
    sps_id = value(sequence[0], "ScheduledProcedureStepID")
    identity = identity_of(study_uid, sps_id, relative_path, folder)
    if not study_uid:
        study_uid = derived_study_uid(identity)
        item[tag_of("StudyInstanceUID")] = element("StudyInstanceUID", study_uid)
    patient = PatientRecord(PatientKey(patient_id, value(item, "IssuerOfPatientID")),
                            {tag_of(k): item[tag_of(k)] for k in PATIENT_KEYWORDS if tag_of(k) in item})
    procedure = ProcedureRecord(
        requested_procedure_id=value(item, "RequestedProcedureID"), accession_number=value(item, "AccessionNumber"),
        study_instance_uid=study_uid, description=value(item, "RequestedProcedureDescription"),
        steps=[StepRecord(sps_id, item)])
    order = OrderRecord(placer_order_number=order_number(identity), placer_issuer=ORDER_ISSUER,
                        filler_order_number="", filler_issuer="", order_control="NW", order_status="SC",
                        procedures=[procedure])
    return WorklistEntry(identity, patient, order)


Parsed = tuple[WorklistEntry | None, str, bool]
"""A file read: (its entry, "", False) or (None, the refusal's reason, whether it is unreadable)."""


def parse_many(folder: str, files: list[tuple[str, bytes]]) -> list[Parsed]:
    """:func:`read_entry` of several files of a folder (relative path, bytes) in one call, with the
    refusals as values: what the parsing process of a large scan or import sends back (picklable)."""
    parsed: list[Parsed] = []
    for relative_path, data in files:
        try:
            parsed.append((read_entry(data, relative_path, folder), "", False))
        except FileRefused as exc:
            parsed.append((None, exc.reason, exc.unreadable))
    return parsed


def dump(data: bytes) -> str:
    """A stored file's bytes as readable text (pydicom's dump), for the archive's view of a file; a
    file that is no DICOM is shown as the reason it was refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return str(dcmread(io.BytesIO(data), force=True))
    except Exception as exc:  # whatever the bytes are, the view shows something
        return f"(not a readable DICOM file: {type(exc).__name__}, {len(data)} bytes)"
