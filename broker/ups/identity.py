"""The UPS SOP Instance UID of a step HL7 scheduled: a name-based UUID (RFC 4122 v5) under 2.25.

Derived from the step's identity (Study Instance UID + SPS ID), so it is the same whenever it is
computed: at intake, in migration 0004 for the steps stored before it, and in any copy of the
database. A step made by UPS N-CREATE keeps the SCU's (or the SCP-assigned) UID instead.
"""

from __future__ import annotations

import uuid

# The namespace of the derivation; changing it would change every HL7 step's UPS UID.
NAMESPACE = uuid.UUID("5b0d43a4-7d1f-4f56-9a55-3c2f6c0a2b1e")


def derived_ups_uid(study_instance_uid: str, sps_id: str) -> str:
    """``2.25.<decimal UUID>`` of the step, at most 44 characters."""
    return "2.25." + str(uuid.uuid5(NAMESPACE, f"{study_instance_uid}\\{sps_id}").int)
