"""A domain :class:`~broker.workflow.outcome.Outcome` as the status part of a DIMSE response."""

from __future__ import annotations

from pydicom.dataset import Dataset

from broker.workflow.outcome import Outcome


def status_dataset(outcome: Outcome) -> Dataset:
    """Status, Error Comment, Error ID and Offending Element of ``outcome`` (PS3.7 annex C)."""
    status = Dataset()
    status.Status = outcome.status
    if outcome.error_comment:
        status.ErrorComment = outcome.error_comment[:64]
    if outcome.error_id is not None:
        status.ErrorID = outcome.error_id
    if outcome.offending:
        status.OffendingElement = list(outcome.offending)
    return status


def failure_dataset(status_code: int, comment: str) -> Dataset:
    """A failure status with an Error Comment (cut to the 64 characters of LO)."""
    status = Dataset()
    status.Status = status_code
    status.ErrorComment = comment[:64]
    return status
