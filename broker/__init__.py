"""Modality worklist and workflow broker: HL7 v2 orders in, DICOM worklist, MPPS and UPS out."""

__version__ = "0.1.0"
