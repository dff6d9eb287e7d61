"""Wiring of the workflow services for the DICOM edge: one :class:`Workflow` per process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine

from broker.config import Settings
from broker.ian.service import IanService
from broker.mpps.service import MppsService
from broker.stgcmt.service import CommitmentService
from broker.ups.service import UpsService
from broker.workflow.context import WorkflowConfig


@dataclass(frozen=True)
class Workflow:
    """The services a DICOM edge calls."""

    mpps: MppsService
    ian: IanService
    commitment: CommitmentService
    ups: UpsService


def build_workflow(settings: Settings, engine: Engine, wake: Callable[[], None] | None = None) -> Workflow:
    """The services on ``engine`` (a read-write engine), waking the relay after commits that queued events."""
    config = WorkflowConfig.from_settings(settings)
    commitment = CommitmentService(engine, config, wake)
    return Workflow(MppsService(engine, config, wake, commitment=commitment),
                    IanService(engine, config, wake, commitment=commitment), commitment,
                    UpsService(engine, config, wake, known_aes=frozenset(settings.peers), uid_root=settings.uid_root))
