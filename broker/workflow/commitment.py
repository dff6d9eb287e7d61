"""Asking the archive for Storage Commitment, in the transaction of the event that calls for it.

MPPS COMPLETED and an IAN both ask; the Storage Commitment service records the archive's answers and
the timeout. Creating the request lives here, below all three, so MPPS and IAN need not know the
Storage Commitment service (they get a :class:`CommitmentRequests`; the workflow of a process gives
them its :class:`~broker.stgcmt.service.CommitmentService`, which asks the same way).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import structlog
from pydicom.uid import generate_uid
from sqlalchemy import Connection, insert, select

from broker.outbox import outbox
from broker.store.tables import CommitmentItem, CommitmentRequest, table_of
from broker.workflow.context import WorkflowConfig
from broker.workflow.instances import procedure_instances

log = structlog.get_logger(__name__)

REQUESTS = table_of(CommitmentRequest)
ITEMS = table_of(CommitmentItem)


class CommitmentRequests(Protocol):
    """Whatever creates commitment requests for a procedure (see :func:`request_commitment`)."""

    def request_commitment(self, db: Connection, procedure_pk: int) -> str | None: ...


def request_commitment(db: Connection, procedure_pk: int, config: WorkflowConfig,
                       clock: Callable[[], datetime]) -> str | None:
    """Ask the archive to commit every instance known for the procedure, in the caller's transaction.

    Returns the Transaction UID, or None when no archive is configured or no instance is known.
    A PENDING or COMMITTED request for exactly the same instances is not repeated (an IAN after
    MPPS COMPLETED usually names the same instances): its Transaction UID is returned instead.
    """
    if not config.archive_ae:
        return None
    instances = procedure_instances(db, procedure_pk)
    if not instances:
        return None
    wanted = set(instances)
    for request in db.execute(select(REQUESTS.c.id, REQUESTS.c.transaction_uid).where(
            REQUESTS.c.procedure_fk == procedure_pk, REQUESTS.c.status.in_(["PENDING", "COMMITTED"]))):
        asked = {(r.sop_class_uid, r.sop_instance_uid) for r in db.execute(
            select(ITEMS.c.sop_class_uid, ITEMS.c.sop_instance_uid).where(ITEMS.c.request_fk == request.id))}
        if asked == wanted:
            return str(request.transaction_uid)
    now = clock()
    transaction_uid = generate_uid(prefix=f"{config.uid_root}." if config.uid_root else None)
    request_pk = db.execute(insert(REQUESTS).returning(REQUESTS.c.id), {
        "transaction_uid": transaction_uid, "procedure_fk": procedure_pk, "archive_ae": config.archive_ae,
        "status": "PENDING", "reason": "", "requested_at": now, "answered_at": None}).scalar_one()
    db.execute(insert(ITEMS), [{"request_fk": request_pk, "sop_class_uid": c, "sop_instance_uid": i,
                                "committed": None, "failure_reason": None} for c, i in instances])
    outbox.add_event(db, outbox.STGCMT_REQUEST, {"transaction_uid": transaction_uid,
                                                 "archive_ae": config.archive_ae},
                     f"stgcmt:{transaction_uid}", now)
    log.info("stgcmt.requested", procedure_pk=procedure_pk, transaction_uid=transaction_uid,
             instances=len(instances))
    return transaction_uid


class Requester:
    """:class:`CommitmentRequests` on a configuration and a clock: what MPPS and IAN use when the
    workflow gives them no Storage Commitment service of their process."""

    def __init__(self, config: WorkflowConfig, clock: Callable[[], datetime] = datetime.now) -> None:
        self.config = config
        self.clock = clock

    def request_commitment(self, db: Connection, procedure_pk: int) -> str | None:
        return request_commitment(db, procedure_pk, self.config, self.clock)
