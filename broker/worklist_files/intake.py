"""Applying one worklist file: the same domain commands, archive row, timeline, outbox events, audit
records and board entries as an HL7 order, in one transaction per file.

The order of operations follows the HL7 intake (:mod:`broker.intake.service`):

1. The file's bytes are committed to ``inbound_messages`` (message type ``DICOM^WL``, peer ``file
   <path>``, sender ``folder <folder>``) before anything is applied; a deletion is archived as
   ``DICOM^WL-DEL`` with no bytes. So every file read is listed with the inbound messages, and one
   that failed is listed with the failed intakes (status ``error``, the reason in ``error``).
2. The file is read into a domain command (:mod:`broker.worklist_files.reading`): a new identity places
   an order (a new SCHEDULED step), a known one replaces it (the step's item is rewritten while the
   step has not finished), a deletion cancels it (setting ``worklist_on_delete``).
3. The domain changes, the outcome on the archive row and the file's state row (``worklist_files``)
   commit together; a refusal rolls the changes back and records the refusal. The same bytes are never
   applied twice: a file whose hash equals the last one applied is ``unchanged``, which is what makes
   the rescan after a restart import nothing.

An unreadable file is moved aside by the caller (:mod:`broker.worklist_files.folders`); a refused one
is only re-read once its bytes change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from broker.audit.events import Source
from broker.audit.trail import broker_participant
from broker.domain.auditing import ChangeAudit
from broker.domain.records import Cause, OrderRecord
from broker.domain.services import DomainError, WorklistService
from broker.domain.states import FINAL, StepStatus
from broker.store.tables import InboundMessage, ScheduledStep, WorklistFile, table_of
from broker.worklist_files.identity import ORDER_ISSUER, order_number
from broker.worklist_files.reading import FileRefused, WorklistEntry, read_entry

log = structlog.get_logger(__name__)
MESSAGES = table_of(InboundMessage)
FILES = table_of(WorklistFile)
STEPS = table_of(ScheduledStep)
MESSAGE_TYPE = "DICOM^WL"
DELETE_TYPE = "DICOM^WL-DEL"
RETRIES = 3
ON_DELETE = ("cancel", "keep")
# Built once: a batch of thousands of files would otherwise build them per file (SQLAlchemy's
# statement construction cost about as much as the database work).
_INSERT_MESSAGE = insert(MESSAGES).returning(MESSAGES.c.id, sort_by_parameter_order=True)
_UPDATE_FILE = update(FILES).where(FILES.c.id == bindparam("pk"))
_RECORD_OUTCOME = update(MESSAGES).where(MESSAGES.c.id == bindparam("pk"))


@dataclass(frozen=True)
class Outcome:
    """What became of one file: created, updated, unchanged, refused, unreadable, cancelled, removed."""

    path: str
    outcome: str
    identity: str = ""
    error: str = ""
    message_id: int | None = None

    @property
    def failed(self) -> bool:
        """Whether the file is a failed intake (listed with the inbound messages in error)."""
        return self.outcome in ("refused", "unreadable")


@dataclass(frozen=True)
class FileStat:
    """A file's size and modification time: unchanged ones are not opened again."""

    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Read:
    """A file's bytes as read, complete, with the size and time they were read at."""

    path: str
    data: bytes
    stat: FileStat


@dataclass(eq=False)
class _Job:
    """One file on its way through a batch."""

    read: Read
    digest: str
    state: Any  # its worklist_files row, or None
    entry: WorklistEntry | None = None
    refusal: Outcome | None = None  # why it cannot be applied, found while reading it
    message_id: int | None = None
    outcome: Outcome = field(default_factory=lambda: Outcome("", ""))


class FileIntake:
    """Applies worklist files of a folder (``folder``: the key of its state rows, its resolved path)."""

    def __init__(self, engine: Engine, *, on_delete: str = "cancel", audit: bool = True, ae_title: str = "BROKER",
                 clock: Callable[[], datetime] = datetime.now) -> None:
        if on_delete not in ON_DELETE:
            raise ValueError(f"on_delete must be one of {ON_DELETE}")
        self.engine = engine
        self.on_delete = on_delete
        self.audit = audit
        self.ae_title = ae_title
        self.clock = clock

    # --- state ------------------------------------------------------------------------------------------
    def known(self, folder: str) -> dict[str, Any]:
        """The state rows of a folder by path (present or not)."""
        with self.engine.connect() as db:
            return {row.path: row for row in db.execute(select(FILES).where(FILES.c.folder == folder))}

    def touch(self, folder: str, path: str, stat: FileStat) -> None:
        """Note a file's new size and time when its bytes are the same as those last applied."""
        with self.engine.begin() as db:
            db.execute(update(FILES).where(FILES.c.folder == folder, FILES.c.path == path)
                       .values(size=stat.size, mtime_ns=stat.mtime_ns))

    def forget(self, folder: str, path: str) -> None:
        """Mark a file gone without touching its step (an unreadable file moved aside)."""
        with self.engine.begin() as db:
            db.execute(update(FILES).where(FILES.c.folder == folder, FILES.c.path == path).values(present=False))

    # --- a file written -----------------------------------------------------------------------------------
    def apply(self, folder: str, path: str, data: bytes, stat: FileStat, *, dry_run: bool = False) -> Outcome:
        """Apply a file's bytes (new or changed). ``dry_run``: say what would happen, change nothing."""
        return self.apply_many(folder, [Read(path, data, stat)], dry_run=dry_run)[0]

    def apply_many(self, folder: str, files: list[Read], *, dry_run: bool = False) -> list[Outcome]:
        """Apply several files of a folder: one archive transaction for all, then one transaction in
        which each file has its own SAVEPOINT (a refused file's changes are rolled back alone), so a
        scan or an import commits once per batch instead of twice per file."""
        with self.engine.connect() as db:
            states = {row.path: row for row in db.execute(select(FILES).where(
                FILES.c.folder == folder, FILES.c.path.in_([f.path for f in files])))}
        outcomes: dict[str, Outcome] = {}
        jobs: list[_Job] = []
        for read in files:
            state = states.get(read.path)
            digest = hashlib.sha256(read.data).hexdigest()
            if state is not None and state.present and state.sha256 == digest:
                if not dry_run and (state.size, state.mtime_ns) != (read.stat.size, read.stat.mtime_ns):
                    self.touch(folder, read.path, read.stat)
                outcomes[read.path] = Outcome(read.path, "unchanged", state.identity)
                continue
            job = _Job(read, digest, state)
            try:
                job.entry = read_entry(read.data, read.path)
            except FileRefused as exc:
                job.refusal = Outcome(read.path, "unreadable" if exc.unreadable else "refused", "", exc.reason)
            if dry_run:
                outcomes[read.path] = job.refusal or self._preview(read.path, job.entry)
            else:
                jobs.append(job)
        if jobs:
            self._archive_all(folder, jobs)
            self._apply_jobs(folder, jobs)
            for job in jobs:
                outcome = outcomes[job.read.path] = job.outcome
                if outcome.failed:
                    log.warning("worklist_file.refused", folder=folder, path=outcome.path, reason=outcome.error,
                                message_id=outcome.message_id)
                else:
                    log.info("worklist_file.applied", folder=folder, path=outcome.path, outcome=outcome.outcome,
                             message_id=outcome.message_id)
        return [outcomes[read.path] for read in files]

    def _apply_jobs(self, folder: str, jobs: list[_Job]) -> None:
        """The processing transaction of a batch, retried whole when the database is busy."""
        for attempt in range(RETRIES):
            try:
                with self.engine.begin() as db:
                    for job in jobs:
                        self._apply_job(db, folder, job)
                return
            except OperationalError:
                if attempt == RETRIES - 1:
                    raise
                log.warning("worklist_file.retry", attempt=attempt + 1, batch=len(jobs))

    def _apply_job(self, db: Connection, folder: str, job: _Job) -> None:
        """One file in its savepoint: applied, or rolled back and recorded as refused."""
        assert job.message_id is not None
        path = job.read.path
        if job.refusal is not None:
            job.outcome = Outcome(path, job.refusal.outcome, "", job.refusal.error, job.message_id)
            self._finish(db, folder, job, job.outcome)
            return
        assert job.entry is not None
        reason = ""
        for _attempt in range(2):  # an IntegrityError is a concurrent writer (HL7) of the same patient: once more
            savepoint = db.begin_nested()
            try:
                outcome = self._apply_entry(db, folder, path, job.entry, job.state, job.message_id)
                self._finish(db, folder, job, outcome)
                savepoint.commit()
                job.outcome = outcome
                return
            except _Refused as exc:
                savepoint.rollback()
                reason = exc.reason
                break
            except IntegrityError as exc:
                savepoint.rollback()
                reason = f"conflict ({type(exc.orig).__name__})"
        job.outcome = Outcome(path, "refused", job.entry.identity, reason, job.message_id)
        self._finish(db, folder, job, job.outcome)

    def _preview(self, path: str, entry: WorklistEntry | None) -> Outcome:
        """What :meth:`apply` would do with a readable file, read without changing anything."""
        assert entry is not None
        with self.engine.connect() as db:
            exists = WorklistService(db).find_order(entry.order) is not None
        return Outcome(path, "updated" if exists else "created", entry.identity)

    def _apply_entry(self, db: Connection, folder: str, path: str, entry: WorklistEntry, state: Any,
                     message_id: int) -> Outcome:
        service = self._service(db, folder)
        cause = Cause(f"worklist file {path}"[:200], message_id, event_kind="file", event_ref=path[-64:])
        if state is not None and state.present and state.identity and state.identity != entry.identity:
            self._forget_identity(db, service, folder, path, state.identity, cause)  # the file now names another step
        try:
            if service.find_order(entry.order) is None:
                service.place_order(entry.patient, entry.order, f"folder {folder}", cause)
                return Outcome(path, "created", entry.identity, "", message_id)
            service.replace_order(entry.patient, entry.order, cause)
        except DomainError as exc:
            raise _Refused(exc.text) from exc
        [procedure] = entry.order.procedures
        status = db.execute(select(STEPS.c.sps_status).where(
            STEPS.c.study_instance_uid == procedure.study_instance_uid,
            STEPS.c.sps_id == procedure.steps[0].sps_id)).scalar()
        if status in FINAL:
            return Outcome(path, "unchanged", entry.identity, f"the step is {status}: a finished step is not changed",
                           message_id)
        return Outcome(path, "updated", entry.identity, "", message_id)

    # --- a file deleted -----------------------------------------------------------------------------------
    def remove(self, folder: str, path: str, *, dry_run: bool = False) -> Outcome:
        """A file that is gone: its step is cancelled (``on_delete`` cancel) unless another present file
        names the same step, or left as it is (keep)."""
        with self.engine.connect() as db:
            state = db.execute(select(FILES).where(FILES.c.folder == folder, FILES.c.path == path)).first()
        if state is None or not state.present:
            return Outcome(path, "unchanged")
        outcome_name = "cancelled" if self.on_delete == "cancel" and state.identity else "removed"
        if dry_run:
            return Outcome(path, outcome_name, state.identity)
        message_id = self._archive(folder, path, b"", DELETE_TYPE)
        with self.engine.begin() as db:
            outcome = Outcome(path, "removed", state.identity, "", message_id)
            if outcome_name == "cancelled":
                cause = Cause(f"worklist file {path} deleted"[:200], message_id, event_kind="file",
                              event_ref=path[-64:])
                if self._forget_identity(db, self._service(db, folder), folder, path, state.identity, cause):
                    outcome = Outcome(path, "cancelled", state.identity, "", message_id)
            db.execute(update(FILES).where(FILES.c.id == state.id).values(present=False, outcome=outcome.outcome,
                                                                          error="", message_id=message_id,
                                                                          read_at=self.clock()))
            self._record(db, message_id, outcome)
        log.info("worklist_file.deleted", folder=folder, path=path, outcome=outcome.outcome, message_id=message_id)
        return outcome

    def _forget_identity(self, db: Connection, service: WorklistService, folder: str, path: str, identity: str,
                         cause: Cause) -> bool:
        """Cancel the step of ``identity`` unless another present file still names it (or on_delete keep).
        Returns whether it was cancelled."""
        if self.on_delete != "cancel":
            return False
        others = db.execute(select(FILES.c.id).where(FILES.c.identity == identity, FILES.c.present.is_(True),
                                                     ~((FILES.c.folder == folder) & (FILES.c.path == path)))
                            .limit(1)).first()
        if others is not None:
            return False
        record = OrderRecord(order_number(identity), ORDER_ISSUER, "", "", "CA", "CA")
        try:
            return service.change_order_status(record, StepStatus.CANCELED, cause) > 0
        except DomainError:  # the order was never made (the file was refused): nothing to cancel
            return False

    # --- the archive and the state row --------------------------------------------------------------------
    def _archive(self, folder: str, path: str, data: bytes, message_type: str) -> int:
        """Store a deletion before it is applied; returns the archive row's id."""
        with self.engine.begin() as db:
            return int(db.execute(_INSERT_MESSAGE, [self._archive_row(folder, path, data, message_type)]).scalar_one())

    def _archive_all(self, folder: str, jobs: list[_Job]) -> None:
        """Store every file's bytes, in one transaction, before anything is applied."""
        rows = [self._archive_row(folder, job.read.path, job.read.data, MESSAGE_TYPE) for job in jobs]
        for attempt in range(RETRIES):
            try:
                with self.engine.begin() as db:
                    ids = list(db.execute(_INSERT_MESSAGE, rows).scalars())
                break
            except OperationalError:
                if attempt == RETRIES - 1:
                    raise
        for job, message_id in zip(jobs, ids, strict=True):
            job.message_id = int(message_id)

    def _archive_row(self, folder: str, path: str, data: bytes, message_type: str) -> dict[str, Any]:
        return {"received_at": self.clock(), "peer": f"file {path}"[:100], "sender": f"folder {folder}"[-200:],
                "control_id": "", "message_type": message_type, "raw": data, "charset": "", "status": "received"}

    def _finish(self, db: Connection, folder: str, job: _Job, outcome: Outcome) -> None:
        """The file's state row and its archive row's outcome, in the caller's transaction."""
        values = {"size": job.read.stat.size, "mtime_ns": job.read.stat.mtime_ns, "sha256": job.digest,
                  "identity": outcome.identity, "outcome": outcome.outcome, "error": outcome.error,
                  "message_id": outcome.message_id, "present": True, "read_at": self.clock()}
        if job.state is not None:
            db.execute(_UPDATE_FILE, {"pk": job.state.id, **values})
        else:
            db.execute(insert(FILES), {"folder": folder, "path": job.read.path, **values})
        if outcome.message_id is not None:
            self._record(db, outcome.message_id, outcome)

    def _record(self, db: Connection, message_id: int, outcome: Outcome) -> None:
        failed = outcome.failed
        db.execute(_RECORD_OUTCOME, {
            "pk": message_id, "status": "error" if failed else "accepted", "ack_code": "AE" if failed else "AA",
            "processed_at": self.clock(), "error": outcome.error[:4000],
            "ack": f"{outcome.outcome} {outcome.identity}".strip().encode("utf-8")})

    def _service(self, db: Connection, folder: str) -> WorklistService:
        audit = None
        if self.audit:
            audit = ChangeAudit(Source("worklist folder " + folder[-180:], "", "broker"),
                                broker_participant(self.ae_title))
        return WorklistService(db, clock=self.clock, audit=audit)


class _Refused(Exception):
    """A domain refusal: the file's changes are rolled back and the refusal is recorded."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
