"""What the workflow services share: their configuration and the one-transaction rule.

Each service call is one transaction: the state change and its outbox rows commit together before
the service returns success, so the edge answers the modality only for what is durable. After a
commit that added outbox rows the relay is woken, so a side effect does not wait for a poll.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from broker.audit.events import Participant, Source
from broker.audit.trail import broker_participant
from broker.config import Settings
from broker.domain.auditing import ChangeAudit
from broker.domain.procedure_tracker import ProcedureTracker
from broker.outbox import outbox
from broker.workflow.outcome import DUPLICATE_SOP_INSTANCE, PROCESSING_FAILURE, Outcome, failure

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WorkflowConfig:
    """The settings the workflow services read (see broker.config for their meaning)."""

    ris_transitions: frozenset[str] = frozenset()  # empty when no RIS address is configured
    archive_ae: str = ""
    forward_aes: tuple[str, ...] = ()
    uid_root: str = ""
    stgcmt_timeout: float = 3600.0
    audit: bool = False  # the changes are recorded in the audit trail (setting audit_enabled)
    ae_title: str = "BROKER"  # the broker's AE title, as the audit records name it

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkflowConfig:
        return cls(ris_transitions=settings.ris_transitions if settings.ris_address else frozenset(),
                   archive_ae=settings.stgcmt_archive_ae, forward_aes=tuple(settings.mpps_forward_targets),
                   uid_root=settings.uid_root, stgcmt_timeout=settings.stgcmt_timeout,
                   audit=settings.audit_enabled, ae_title=settings.ae_title)


def _no_wake() -> None:
    return None


class TransactionalService:
    """Base of the services: an engine, the configuration, a clock and the relay's wake-up."""

    def __init__(self, engine: Engine, config: WorkflowConfig | None = None,
                 wake: Callable[[], None] | None = None, clock: Callable[[], datetime] = datetime.now) -> None:
        self.engine = engine
        self.config = config or WorkflowConfig()
        self.wake = wake or _no_wake
        self.clock = clock
        self.procedures = ProcedureTracker(self.config.ris_transitions, clock)
        self._broker: Participant | None = None

    def change_audit(self, source: Source) -> ChangeAudit | None:
        """The audit of changes asked for by ``source`` (None when the changes are not recorded)."""
        if not self.config.audit:
            return None
        if self._broker is None:  # made once: the broker's host name and process do not change
            self._broker = broker_participant(self.config.ae_title)
        return ChangeAudit(source, self._broker)

    @staticmethod
    def dicom_source(calling_ae: str, host: str) -> Source:
        """A DICOM requestor: its calling AE title at its address."""
        return Source(calling_ae, host, "dicom")

    def in_transaction(self, work: Callable[[Connection], Outcome], what: str) -> Outcome:
        """Run ``work`` in one transaction; commit only a success (a failure outcome rolls back).

        A unique-key violation (a concurrent duplicate create) becomes 0x0111; any other database
        failure 0x0110, logged: the modality keeps its data and may send again.
        """
        added = False
        try:
            with self.engine.connect() as db:
                outbox.take_added_flag(db)  # the flag lives on the pooled connection: start clean
                with db.begin() as transaction:
                    outcome = work(db)
                    if not outcome.ok:
                        transaction.rollback()
                added = outbox.take_added_flag(db) and outcome.ok
        except IntegrityError:
            log.info("workflow.duplicate", operation=what)
            return failure(DUPLICATE_SOP_INSTANCE, "SOP Instance exists already")
        except SQLAlchemyError as exc:
            log.exception("workflow.database_failure", operation=what, error=type(exc).__name__)
            return failure(PROCESSING_FAILURE, "database unavailable; please retry")
        if added:
            self.wake()
        return outcome
