"""HL7 v2 intake: MLLP transport, parsing, mapping to worklist items and acknowledgements."""
