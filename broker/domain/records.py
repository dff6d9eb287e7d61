"""The data a domain command carries: patients, orders, requested procedures, scheduled steps.

These are what the HL7 mapping produces and what the REST API will produce; the domain services
turn them into stored rows. Worklist content is DICOM JSON (PS3.18 F.2) keyed by tag, so the
worklist, UPS and REST views return exactly what was mapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.dicom_json import JsonDataset


@dataclass(frozen=True)
class PatientKey:
    """Patient ID within its issuer: how the RIS/HIS names a patient."""

    patient_id: str
    issuer: str = ""

    def __str__(self) -> str:
        return f"{self.patient_id}^^^{self.issuer}" if self.issuer else self.patient_id


@dataclass
class PatientRecord:
    """A patient's identity and the patient-level attributes a message carried.

    ``attributes`` holds only what the message sent; a tag whose element has no "Value" means the
    sender cleared it (HL7 ``""``). Absent tags are left as stored.
    """

    key: PatientKey
    attributes: JsonDataset = field(default_factory=dict)


@dataclass
class StepRecord:
    """One scheduled procedure step: the worklist item's step-level and item-level attributes."""

    sps_id: str
    item: JsonDataset  # whole item without patient attributes; exactly one SPS Sequence item


@dataclass
class ProcedureRecord:
    """A requested procedure with its steps."""

    requested_procedure_id: str
    accession_number: str
    study_instance_uid: str
    description: str
    steps: list[StepRecord] = field(default_factory=list)


@dataclass
class OrderRecord:
    """An order (one ORC) with the requested procedures the message lists for it."""

    placer_order_number: str
    placer_issuer: str
    filler_order_number: str
    filler_issuer: str
    order_control: str  # ORC-1
    order_status: str  # ORC-5
    procedures: list[ProcedureRecord] = field(default_factory=list)


@dataclass(frozen=True)
class Cause:
    """Why a change happened: shown in a procedure's timeline."""

    text: str
    inbound_message_id: int | None = None
    # Where the cause came from (hl7, mpps, ian, stgcmt) and which event: HL7 control ID, MPPS or IAN
    # SOP Instance UID, commitment Transaction UID. Procedure transitions store both.
    event_kind: str = "hl7"
    event_ref: str = ""
