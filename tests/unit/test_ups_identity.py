"""The UPS UID of an HL7 step is uuid.uuid5 under 2.25, also where it is computed without uuid."""

from __future__ import annotations

import uuid

import pytest

from broker.domain.ups_identity import NAMESPACE, derived_ups_uid


@pytest.mark.parametrize(("study", "sps"), [
    ("1.2.826.0.1.3680043.10.543.77001", "SPS77001"), ("", ""), ("1.2.3", ""), ("", "S\\1"),
    ("1.2.840.1", "SPS ÄÖ 中"), ("9" * 64, "X" * 16),
])
def test_derived_ups_uid_is_the_name_based_uuid(study: str, sps: str) -> None:
    expected = "2.25." + str(uuid.uuid5(NAMESPACE, f"{study}\\{sps}").int)
    assert derived_ups_uid(study, sps) == expected
    assert len(derived_ups_uid(study, sps)) <= 44
