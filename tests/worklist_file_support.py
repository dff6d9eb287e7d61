"""``.wl`` files as an interface engine writes them for DCMTK wlmscpfs or Orthanc: one DICOM file per
worklist item (File Meta header, Explicit VR Little Endian), written under a hidden name and renamed."""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

UID_PREFIX = "1.2.826.0.1.3680043.10.543.23."


@dataclass(frozen=True)
class Item:
    """One worklist item with the attributes wlmscpfs needs of a file (it ignores incomplete ones)."""

    sps_id: str
    station: str = "CT01"
    modality: str = "CT"
    date: str = "20261123"
    time: str = "090000"
    name: str = "DOE^JANE"
    patient_id: str = ""
    birth_date: str = "19700101"
    sex: str = "F"
    accession: str = ""
    study_uid: str = ""
    performing: str = "GREY^MEREDITH"
    description: str = "CT HEAD"
    charset: str = ""
    status: str = ""

    def dataset(self) -> Dataset:
        ds = Dataset()
        if self.charset:
            ds.SpecificCharacterSet = self.charset
        ds.AccessionNumber = self.accession or f"A-{self.sps_id}"
        ds.ReferringPhysicianName = "HOUSE^GREGORY"
        ds.PatientName = self.name
        ds.PatientID = self.patient_id or f"P-{self.sps_id}"
        ds.PatientBirthDate = self.birth_date
        ds.PatientSex = self.sex
        ds.StudyInstanceUID = self.study_uid or f"{UID_PREFIX}{zlib.crc32(self.sps_id.encode())}"
        ds.RequestingPhysician = "CUDDY^LISA"
        ds.RequestedProcedureDescription = self.description
        ds.RequestedProcedureID = f"RP-{self.sps_id}"[:16]
        ds.RequestedProcedurePriority = "ROUTINE"
        step = Dataset()
        step.ScheduledStationAETitle = self.station
        step.ScheduledProcedureStepStartDate = self.date
        step.ScheduledProcedureStepStartTime = self.time
        step.Modality = self.modality
        step.ScheduledPerformingPhysicianName = self.performing
        step.ScheduledProcedureStepDescription = self.description
        step.ScheduledStationName = f"{self.station}-ROOM"[:16]
        step.ScheduledProcedureStepLocation = "RAD-1"
        step.ScheduledProcedureStepID = self.sps_id
        if self.status:
            step.ScheduledProcedureStepStatus = self.status
        ds.ScheduledProcedureStepSequence = [step]
        return ds


def wl_bytes(ds: Dataset) -> bytes:
    """A dataset as a .wl file's bytes (File Meta header, Explicit VR Little Endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
    meta.MediaStorageSOPInstanceUID = f"{UID_PREFIX}9.{zlib.crc32(repr(ds).encode())}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_wl(path: Path, content: Dataset | bytes) -> Path:
    """Write a .wl file as interface engines do: a hidden temporary name, then a rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content if isinstance(content, bytes) else wl_bytes(content)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return path
