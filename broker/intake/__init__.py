"""HL7 intake: from a decoded message to a domain command and its stored ACK (dispatch, mapping, archive), the
intake processes that serve MLLP connections on every core, and the mapping preview of ``broker mapping test``."""
