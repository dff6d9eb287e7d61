"""Scheduled Procedure Step Status (0040,0020) values and which are final."""

from __future__ import annotations

from enum import StrEnum


class StepStatus(StrEnum):
    """Defined terms of SPS Status (PS3.3 C.4.10) the broker uses."""

    SCHEDULED = "SCHEDULED"
    ARRIVED = "ARRIVED"
    READY = "READY"
    STARTED = "STARTED"
    DEPARTED = "DEPARTED"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"
    DISCONTINUED = "DISCONTINUED"


FINAL = frozenset({StepStatus.COMPLETED, StepStatus.CANCELED, StepStatus.DISCONTINUED})
NOT_STARTED = frozenset({StepStatus.SCHEDULED, StepStatus.ARRIVED, StepStatus.READY})
OPEN = frozenset(StepStatus) - FINAL
