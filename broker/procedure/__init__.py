"""The state of a requested procedure, as DICOM and HL7 events move it forward (issue 4)."""
