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
from broker.store.tables import InboundMessage, Order, ScheduledStep, WorklistFile, table_of
from broker.worklist_files.identity import ORDER_ISSUER, order_number
from broker.worklist_files.reading import Parsed, WorklistEntry, parse_many

log = structlog.get_logger(__name__)
MESSAGES = table_of(InboundMessage)
FILES = table_of(WorklistFile)
STEPS = table_of(ScheduledStep)
ORDERS = table_of(Order)
MESSAGE_TYPE = "DICOM^WL"
DELETE_TYPE = "DICOM^WL-DEL"
RETRIES = 3
ON_DELETE = ("cancel", "keep")
# Built once: a batch of thousands of files would otherwise build them per file (SQLAlchemy's
# statement construction cost about as much as the database work).
_INSERT_MESSAGE = insert(MESSAGES).returning(MESSAGES.c.id, sort_by_parameter_order=True)
_UPDATE_FILE = update(FILES).where(FILES.c.id == bindparam("pk"))
_RECORD_OUTCOME = update(MESSAGES).where(MESSAGES.c.id == bindparam("pk"))
_TOUCH_FILE = update(FILES).where(FILES.c.id == bindparam("pk"))


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
    """A file's bytes as read, complete, with the size and time they were read at; ``refusal``: why
    it was not read at all (too large), then ``data`` is empty."""

    path: str
    data: bytes
    stat: FileStat
    refusal: str = ""


@dataclass(eq=False)
class _Job:
    """One file on its way through a batch."""

    read: Read
    digest: str
    state: Any  # its worklist_files row, or None
    folder: str = ""
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

    def apply_many(self, folder: str, files: list[Read], *, dry_run: bool = False,
                   parsed: list[Parsed] | None = None) -> list[Outcome]:
        """Apply several files of a folder: one archive transaction for all, then one processing
        transaction for the batch (see :meth:`_apply_jobs`), so a scan or an import commits twice per
        batch instead of twice per file. ``parsed``: the files already read into entries (by a
        parsing process, :func:`~broker.worklist_files.reading.parse_many`), in the order of ``files``."""
        with self.engine.connect() as db:
            states = {row.path: row for row in db.execute(select(FILES).where(
                FILES.c.folder == folder, FILES.c.path.in_([f.path for f in files])))}
        outcomes: dict[str, Outcome] = {}
        jobs: list[_Job] = []
        touched: list[dict[str, Any]] = []
        for index, read in enumerate(files):
            state = states.get(read.path)
            digest = "" if read.refusal else hashlib.sha256(read.data).hexdigest()
            if state is not None and state.present and digest and state.sha256 == digest:
                if (state.size, state.mtime_ns) != (read.stat.size, read.stat.mtime_ns):
                    touched.append({"pk": state.id, "size": read.stat.size, "mtime_ns": read.stat.mtime_ns})
                outcomes[read.path] = Outcome(read.path, "unchanged", state.identity)
                continue
            job = _Job(read, digest, state, folder)
            entry, reason, unreadable = (None, read.refusal, False) if read.refusal else (
                parsed[index] if parsed is not None else parse_many(folder, [(read.path, read.data)])[0])
            if entry is None:
                job.refusal = Outcome(read.path, "unreadable" if unreadable else "refused", "", reason)
            job.entry = entry
            jobs.append(job)
        if dry_run:
            outcomes.update(self._preview(jobs))
            return [outcomes[read.path] for read in files]
        if touched:
            with self.engine.begin() as db:
                db.execute(_TOUCH_FILE, touched)
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
        """The processing transaction of a batch, retried whole when the database is busy.

        The batch is first applied straight, file after file (no SAVEPOINT round trips); should one
        file be refused by the domain or collide with a concurrent writer, that transaction is rolled
        back and the batch applied again with a SAVEPOINT per file, so that the refused file's changes
        are rolled back alone and the others commit. Either way the state rows and the outcomes on
        the archive rows are written at the end of the same transaction, in one statement each."""
        for attempt in range(RETRIES):
            try:
                if len(jobs) > 1:
                    try:
                        with self.engine.begin() as db:
                            self._apply_batch(db, folder, jobs, careful=False)
                        return
                    except _Conflict:
                        pass
                with self.engine.begin() as db:
                    self._apply_batch(db, folder, jobs, careful=True)
                return
            except OperationalError:
                if attempt == RETRIES - 1:
                    raise
                log.warning("worklist_file.retry", attempt=attempt + 1, batch=len(jobs))

    def _apply_batch(self, db: Connection, folder: str, jobs: list[_Job], *, careful: bool) -> None:
        batch = _Batch(self._existing_orders(db, jobs))
        for job in jobs:
            assert job.message_id is not None
            if job.refusal is not None:
                job.outcome = Outcome(job.read.path, job.refusal.outcome, "", job.refusal.error, job.message_id)
            elif careful:
                self._apply_job(db, folder, job, batch)
            else:
                assert job.entry is not None
                try:
                    job.outcome = self._apply_entry(db, folder, job, batch)
                except (_Refused, IntegrityError) as exc:
                    raise _Conflict from exc
            batch.done(job)
        self._finish_all(db, folder, jobs)

    def _apply_job(self, db: Connection, folder: str, job: _Job, batch: _Batch) -> None:
        """One file in its savepoint: applied, or rolled back and recorded as refused."""
        assert job.entry is not None and job.message_id is not None
        reason = ""
        for _attempt in range(2):  # an IntegrityError is a concurrent writer (HL7) of the same patient: once more
            savepoint = db.begin_nested()
            try:
                outcome = self._apply_entry(db, folder, job, batch)
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
                batch.existing = self._existing_orders(db, [job]) | batch.existing
        job.outcome = Outcome(job.read.path, "refused", job.entry.identity, reason, job.message_id)

    def _existing_orders(self, db: Connection, jobs: list[_Job]) -> set[str]:
        """The placer numbers among the jobs' orders that are stored: one query per batch instead of
        an order lookup per file (on PostgreSQL a prepared OR lookup ran a generic plan that walked
        the orders, milliseconds per file at 10,000 orders)."""
        numbers = sorted({job.entry.order.placer_order_number for job in jobs if job.entry is not None})
        found: set[str] = set()
        for start in range(0, len(numbers), 500):
            found.update(db.execute(select(ORDERS.c.placer_order_number).where(
                ORDERS.c.placer_issuer == ORDER_ISSUER,
                ORDERS.c.placer_order_number.in_(numbers[start:start + 500]))).scalars())
        return found

    def _preview(self, jobs: list[_Job]) -> dict[str, Outcome]:
        """What :meth:`apply_many` would do with the files, found without changing anything."""
        with self.engine.connect() as db:
            existing = self._existing_orders(db, jobs)
        outcomes: dict[str, Outcome] = {}
        for job in jobs:
            if job.entry is None:
                assert job.refusal is not None
                outcomes[job.read.path] = job.refusal
            else:
                known = job.entry.order.placer_order_number in existing
                outcomes[job.read.path] = Outcome(job.read.path, "updated" if known else "created", job.entry.identity)
        return outcomes

    def _apply_entry(self, db: Connection, folder: str, job: _Job, batch: _Batch) -> Outcome:
        """The file's domain command (its step placed, or its item replaced), in the caller's
        transaction; raises _Refused."""
        assert job.entry is not None and job.message_id is not None
        entry, path, state, message_id = job.entry, job.read.path, job.state, job.message_id
        service = self._service(db, folder)
        cause = Cause(f"worklist file {path}"[:200], message_id, event_kind="file", event_ref=path[-64:])
        if state is not None and state.present and state.identity and state.identity != entry.identity:
            # the file now names another step
            self._forget_identity(db, service, folder, path, state.identity, cause, batch)
        number = entry.order.placer_order_number
        try:
            if number not in batch.existing:
                service.place_order(entry.patient, entry.order, f"folder {folder}", cause)
                batch.existing.add(number)
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
                         cause: Cause, batch: _Batch | None = None) -> bool:
        """Cancel the step of ``identity`` unless another present file still names it (or on_delete keep).
        Returns whether it was cancelled. ``batch``: the batch being applied, whose files' state rows
        are written at its end (a file of it that names the identity now keeps it; one that named it
        before and was applied already no longer does)."""
        if self.on_delete != "cancel" or (batch is not None and identity in batch.claimed):
            return False
        others = db.execute(select(FILES.c.folder, FILES.c.path).where(
            FILES.c.identity == identity, FILES.c.present.is_(True),
            ~((FILES.c.folder == folder) & (FILES.c.path == path))).limit(batch.size + 1 if batch else 1)).all()
        if any(batch is None or (row.folder, row.path) not in batch.applied for row in others):
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

    def _finish_all(self, db: Connection, folder: str, jobs: list[_Job]) -> None:
        """The files' state rows and their archive rows' outcomes, in the caller's transaction: one
        statement each for new state rows, changed ones and the outcomes."""
        now = self.clock()
        new_rows: list[dict[str, Any]] = []
        changed_rows: list[dict[str, Any]] = []
        for job in jobs:
            outcome = job.outcome
            values = {"size": job.read.stat.size, "mtime_ns": job.read.stat.mtime_ns, "sha256": job.digest,
                      "identity": outcome.identity, "outcome": outcome.outcome, "error": outcome.error,
                      "message_id": outcome.message_id, "present": True, "read_at": now}
            if job.state is not None:
                changed_rows.append({"pk": job.state.id, **values})
            else:
                new_rows.append({"folder": folder, "path": job.read.path, **values})
        if new_rows:
            db.execute(insert(FILES), new_rows)
        if changed_rows:
            db.execute(_UPDATE_FILE, changed_rows)
        db.execute(_RECORD_OUTCOME, [self._outcome_row(job.outcome, now) for job in jobs])

    def _record(self, db: Connection, message_id: int, outcome: Outcome) -> None:
        db.execute(_RECORD_OUTCOME, self._outcome_row(outcome, self.clock()))

    @staticmethod
    def _outcome_row(outcome: Outcome, now: datetime) -> dict[str, Any]:
        assert outcome.message_id is not None
        failed = outcome.failed
        return {"pk": outcome.message_id, "status": "error" if failed else "accepted",
                "ack_code": "AE" if failed else "AA", "processed_at": now, "error": outcome.error[:4000],
                "ack": f"{outcome.outcome} {outcome.identity}".strip().encode("utf-8")}

    def _service(self, db: Connection, folder: str) -> WorklistService:
        audit = None
        if self.audit:
            audit = ChangeAudit(Source("worklist folder " + folder[-180:], "", "broker"),
                                broker_participant(self.ae_title))
        return WorklistService(db, clock=self.clock, audit=audit)


class _Batch:
    """What the processing transaction of a batch knows beyond the database: the placer numbers of
    the stored orders (:meth:`FileIntake._existing_orders`, then those it placed) and the files it
    applied, whose state rows it writes at its end."""

    def __init__(self, existing: set[str]) -> None:
        self.existing = existing
        self.claimed: set[str] = set()  # identities the applied files name now
        self.applied: set[tuple[str, str]] = set()  # (folder, path) of the applied files
        self.size = 0

    def done(self, job: _Job) -> None:
        self.size += 1
        self.applied.add((job.folder, job.read.path))
        if job.outcome.identity:
            self.claimed.add(job.outcome.identity)


class _Conflict(Exception):
    """A file of a batch applied straight was refused: the batch is applied again, a SAVEPOINT per file."""


class _Refused(Exception):
    """A domain refusal: the file's changes are rolled back and the refusal is recorded."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
