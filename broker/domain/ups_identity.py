"""The UPS SOP Instance UID of a step HL7 scheduled: a name-based UUID (RFC 4122 v5) under 2.25.

Derived from the step's identity (Study Instance UID + SPS ID), so it is the same whenever it is
computed: at intake, in migration 0004 for the steps stored before it, and in any copy of the
database. A step made by UPS N-CREATE keeps the SCU's (or the SCP-assigned) UID instead.
"""

from __future__ import annotations

import hashlib
import uuid

# The namespace of the derivation; changing it would change every HL7 step's UPS UID.
NAMESPACE = uuid.UUID("5b0d43a4-7d1f-4f56-9a55-3c2f6c0a2b1e")
_NAMESPACE_BYTES = NAMESPACE.bytes
# uuid.uuid5's bits, applied to the hash's first 128 bits as an integer (RFC 4122 4.3): version 5 in
# bits 76-79 and the variant 10 in bits 62-63. Each step needs one UID at intake; building the UUID
# object only to read its ``int`` cost about as much as the hash.
_KEEP = ~((0xF000 << 64) | (0xC000 << 48))
_VERSION_AND_VARIANT = (5 << 76) | (0x8000 << 48)


def derived_ups_uid(study_instance_uid: str, sps_id: str) -> str:
    """``2.25.<decimal UUID>`` of the step, at most 44 characters: ``uuid.uuid5(NAMESPACE, ...)``."""
    digest = hashlib.sha1(_NAMESPACE_BYTES + f"{study_instance_uid}\\{sps_id}".encode(),
                          usedforsecurity=False).digest()
    return f"2.25.{int.from_bytes(digest[:16]) & _KEEP | _VERSION_AND_VARIANT}"
