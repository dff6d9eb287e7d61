"""The stored worklist item (DICOM JSON) and the indexed columns derived from it.

The columns are always computed from the item by :func:`index_columns`, never set by hand, so the
JSON returned to a modality and the columns a C-FIND matches on cannot disagree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from broker.dicom_json import JsonDataset, element, tag_of, value

SPS_SEQUENCE = tag_of("ScheduledProcedureStepSequence")


def step_item(item: JsonDataset) -> JsonDataset:
    """The single Scheduled Procedure Step Sequence item of a worklist item."""
    sequence = item.get(SPS_SEQUENCE, {}).get("Value") or [{}]
    step: JsonDataset = sequence[0]
    return step


def build_item(mapped: JsonDataset, patient_attributes: JsonDataset, status: str) -> JsonDataset:
    """A stored item: the mapped item with the patient's current attributes and the step status.

    Elements are shared, not copied: stored items are replaced whole, never changed in place, except
    the SPS item that :func:`set_status` writes into, which is copied here.
    """
    item = {**mapped, **patient_attributes}
    sequence = item.get(SPS_SEQUENCE)
    if sequence and sequence.get("Value"):
        item[SPS_SEQUENCE] = {**sequence, "Value": [dict(sequence["Value"][0])]}
    set_status(item, status)
    return item


def set_status(item: JsonDataset, status: str) -> None:
    """Write SPS Status into the item's step (0040,0020)."""
    step_item(item)[tag_of("ScheduledProcedureStepStatus")] = element("ScheduledProcedureStepStatus", str(status))


def apply_patient_attributes(item: JsonDataset, attributes: JsonDataset) -> None:
    """Overwrite the item's patient-level attributes with ``attributes`` (ADT propagation)."""
    item.update(attributes)


def _norm(pn: str) -> str:
    return pn.upper()


def scheduled_start(date: str, time: str) -> datetime | None:
    """SPS Start Date + Time as one datetime (the key of the combined date-time range).

    Every stored step needs it, and ``strptime`` cost more than the rest of :func:`index_columns`: a
    well-formed value (ASCII digits, each part in its range, as the mapping writes them) is built
    directly; anything else goes through ``strptime``, whose lenient one-digit parts decide it as before.
    """
    if len(date) != 8 or not date.isdigit():
        return None
    digits = (time.split(".")[0] + "000000")[:6] if time else "000000"
    stamp = date + digits
    if stamp.isascii() and stamp.isdigit():
        month, day, hour, minute, second = (int(stamp[4:6]), int(stamp[6:8]), int(stamp[8:10]),
                                            int(stamp[10:12]), int(stamp[12:14]))
        if 1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 59:
            try:  # strptime reads these two digits a part, so it gives the same datetime or error
                return datetime(int(stamp[:4]), month, day, hour, minute, second)
            except ValueError:  # day past the month's end, year 0
                return None
    try:
        return datetime.strptime(stamp, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def index_columns(item: JsonDataset) -> dict[str, Any]:
    """The matching-key columns of ``scheduled_steps`` for one item."""
    step = step_item(item)
    start_date = value(step, "ScheduledProcedureStepStartDate")
    start_time = value(step, "ScheduledProcedureStepStartTime")
    patient_name = value(item, "PatientName")
    performing = value(step, "ScheduledPerformingPhysicianName")
    return {
        "sps_id": value(step, "ScheduledProcedureStepID"),
        "sps_status": value(step, "ScheduledProcedureStepStatus"),
        "scheduled_station_ae_title": value(step, "ScheduledStationAETitle"),
        "scheduled_station_name": value(step, "ScheduledStationName"),
        "sps_location": value(step, "ScheduledProcedureStepLocation"),
        "sps_start_date": start_date,
        "sps_start_time": start_time,
        "scheduled_start": scheduled_start(start_date, start_time),
        "modality": value(step, "Modality"),
        "performing_physician": performing,
        "performing_physician_norm": _norm(performing),
        "patient_name": patient_name,
        "patient_name_norm": _norm(patient_name),
        "patient_id": value(item, "PatientID"),
        "issuer_of_patient_id": value(item, "IssuerOfPatientID"),
        "patient_birth_date": value(item, "PatientBirthDate"),
        "patient_sex": value(item, "PatientSex"),
        "accession_number": value(item, "AccessionNumber"),
        "requested_procedure_id": value(item, "RequestedProcedureID"),
        "study_instance_uid": value(item, "StudyInstanceUID"),
        "referring_physician": value(item, "ReferringPhysicianName"),
        "requesting_physician": value(item, "RequestingPhysician"),
        "admission_id": value(item, "AdmissionID"),
        "placer_order_number": value(item, "PlacerOrderNumberImagingServiceRequest"),
        "filler_order_number": value(item, "FillerOrderNumberImagingServiceRequest"),
        "specific_character_set": value(item, "SpecificCharacterSet"),
    }
