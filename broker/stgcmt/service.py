"""Storage Commitment requests and their results, and the timeout that ends an unanswered request.

A request is created in the transaction of the event that calls for it (MPPS COMPLETED, an IAN) with
one row per referenced instance and an outbox row ``stgcmt.request``; the task sends the N-ACTION.
The archive's N-EVENT-REPORT (on the same association or a new one) is handed to
:meth:`CommitmentService.record_result`, which keeps the result per instance and moves the
procedure to ARCHIVED (all committed) or COMMIT FAILED. Each result that moves a request, and each
timeout, is a Procedure Record (U) in the audit trail, in the same transaction: the archive (its AE
title and address) is the requestor of a result, the broker itself of a timeout.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import structlog
from sqlalchemy import Connection, select, update

from broker.audit.events import Source
from broker.domain.auditing import procedure_subject
from broker.domain.procedure_states import ProcedureState
from broker.domain.records import Cause
from broker.workflow.commitment import ITEMS, REQUESTS, request_commitment
from broker.workflow.context import TransactionalService
from broker.workflow.outcome import INVALID_ARGUMENT_VALUE, SUCCESS, Outcome, failure

log = structlog.get_logger(__name__)

class CommitmentService(TransactionalService):
    """Creates commitment requests and records the archive's answers."""

    def request_commitment(self, db: Connection, procedure_pk: int) -> str | None:
        """Ask the archive to commit every instance known for the procedure, in the caller's transaction
        (:func:`broker.workflow.commitment.request_commitment`)."""
        return request_commitment(db, procedure_pk, self.config, self.clock)

    def record_result(self, transaction_uid: str, committed: Sequence[tuple[str, str]],
                      failed: Sequence[tuple[str, str, int]], calling_ae: str = "", host: str = "") -> Outcome:
        """The archive's N-EVENT-REPORT: ``committed`` (class, instance) and ``failed`` (class, instance,
        Failure Reason). An unknown Transaction UID is 0x0115 (invalid argument value); a report for
        a request already COMMITTED changes nothing; a success after a timeout still archives.
        ``calling_ae`` at ``host``: the archive that reported, the requestor of the audit record."""
        return self.in_transaction(
            lambda db: self._record(db, transaction_uid, committed, failed, calling_ae, host), "stgcmt.result")

    def _record(self, db: Connection, transaction_uid: str, committed: Sequence[tuple[str, str]],
                failed: Sequence[tuple[str, str, int]], calling_ae: str = "", host: str = "") -> Outcome:
        request = db.execute(select(REQUESTS).where(REQUESTS.c.transaction_uid == transaction_uid)).first()
        if request is None:
            log.warning("stgcmt.unknown_transaction", transaction_uid=transaction_uid)
            return failure(INVALID_ARGUMENT_VALUE, "unknown Transaction UID")
        if request.status == "COMMITTED":
            return Outcome(SUCCESS)
        for _sop_class, sop_instance in committed:
            db.execute(update(ITEMS).where(ITEMS.c.request_fk == request.id,
                                           ITEMS.c.sop_instance_uid == sop_instance)
                       .values(committed=True, failure_reason=None))
        for _sop_class, sop_instance, failure_reason in failed:
            db.execute(update(ITEMS).where(ITEMS.c.request_fk == request.id,
                                           ITEMS.c.sop_instance_uid == sop_instance)
                       .values(committed=False, failure_reason=int(failure_reason)))
        now = self.clock()
        if failed:
            status, reason, target = "FAILED", f"{len(failed)} instance(s) not committed", \
                ProcedureState.COMMIT_FAILED
        else:
            status, reason, target = "COMMITTED", "", ProcedureState.ARCHIVED
        db.execute(update(REQUESTS).where(REQUESTS.c.id == request.id)
                   .values(status=status, reason=reason, answered_at=now))
        text = f"Storage Commitment {transaction_uid} " + ("committed" if not failed else reason)
        self.procedures.advance(db, request.procedure_fk, target,
                                Cause(text, event_kind="stgcmt", event_ref=transaction_uid))
        self._audit(db, self.dicom_source(calling_ae or request.archive_ae, host), request.procedure_fk,
                    "Storage Commitment " + ("committed" if not failed else f"failed: {reason}"))
        log.info("stgcmt.answered", transaction_uid=transaction_uid, status=status, committed=len(committed),
                 failed=len(failed))
        return Outcome(SUCCESS)

    def _audit(self, db: Connection, source: Source, procedure_pk: int, description: str) -> None:
        """The Procedure Record of a commitment result (when changes are recorded)."""
        audit = self.change_audit(source)
        subject = procedure_subject(db, procedure_pk) if audit is not None else None
        if audit is not None and subject is not None:
            audit.procedure(db, "U", subject, description, self.clock())

    def sweep_timeouts(self) -> int:
        """Mark PENDING requests older than ``stgcmt_timeout`` FAILED (procedure COMMIT FAILED).
        Returns how many were marked."""
        timeout = self.config.stgcmt_timeout
        marked = 0

        def sweep(db: Connection) -> Outcome:
            nonlocal marked
            now = self.clock()
            expired = list(db.execute(select(REQUESTS.c.id, REQUESTS.c.transaction_uid, REQUESTS.c.procedure_fk)
                                      .where(REQUESTS.c.status == "PENDING",
                                             REQUESTS.c.requested_at < now - timedelta(seconds=timeout))))
            reason = f"no answer within {timeout:g} s"
            for request in expired:
                changed = db.execute(update(REQUESTS).where(REQUESTS.c.id == request.id,
                                                            REQUESTS.c.status == "PENDING")
                                     .values(status="FAILED", reason=reason, answered_at=now)).rowcount
                if changed:
                    marked += 1
                    self.procedures.advance(db, request.procedure_fk, ProcedureState.COMMIT_FAILED,
                                            Cause(f"Storage Commitment {request.transaction_uid}: {reason}",
                                                  event_kind="stgcmt", event_ref=request.transaction_uid))
                    self._audit(db, Source("broker"), request.procedure_fk, f"Storage Commitment failed: {reason}")
                    log.warning("stgcmt.timed_out", transaction_uid=request.transaction_uid)
            return Outcome(SUCCESS)

        self.in_transaction(sweep, "stgcmt.sweep")
        return marked
