"""HL7 v2 to DICOM mapping: value transforms, character sets, mapping rules and the mapping engine."""
