"""HL7 intake: store the raw message, recognise repeats, apply it in one transaction, answer.

The order of operations is what makes "nothing lost" true:

1. The raw bytes are committed to ``inbound_messages`` before anything else (a crash after this
   leaves a ``received`` row that is processed when the sender repeats the message).
2. A repeat of a processed MSH-10 from the same sender (MSH-3^MSH-4) is stored as a duplicate and
   answered with the original ACK; nothing else changes.
3. The message is decoded, mapped and applied; the domain changes and the ACK are committed in one
   transaction; only then is the ACK returned to the connection. Decoding and mapping need no
   database: they happen first, in the connection's thread, before the message waits for SQLite's
   writer lock or a group commit, so that one message is mapped while another one's statements
   and commit run (the GIL is released in the database driver). Their outcome (the domain command,
   or why the message is refused) is kept until the message is known not to be a repeat.
4. A refused message changes nothing (its changes are rolled back); its error ACK is committed to
   the archive row.

When the database cannot be reached the handler raises, the MLLP server closes the connection
without an answer, and the sender (which got no ACK) sends again later.

Group commit (``group_commit=True``): messages that arrive on several connections while a commit is
under way are handled together. One thread (the leader: whichever handler thread finds no batch
running) takes every message waiting at that moment and runs steps 1-4 for all of them: one archive
transaction, then one processing transaction in which each message has its own SAVEPOINT, so a
refusal or a failed statement rolls back that message's changes only; its error ACK is still
recorded. One durable commit (one disk flush) covers the batch, and only then are the ACKs released.
A batch is whatever is waiting when the previous one has committed: nothing waits for a batch to
fill, so a lone sender is handled at once by its own thread, as without group commit. Each
connection has at most one message in the intake (the MLLP server awaits each reply before it
reads on), so the order per connection holds.

Two copies of one MSH-10 are never handled at the same time in one process (with or without group
commit): the later one waits until the earlier one is answered, and is then answered as a duplicate.

Audit (``audit=True``): the domain command records its Order / Patient / Procedure Record in the
message's transaction (with group commit: in its savepoint), so a refused message leaves none. The
requestor is the sender (MSH-3^MSH-4) at the peer's address, or the ``source`` the caller gives (the
HTTP routes: the token and the client's address). Two kinds of message are Security Alerts (Use of
Restricted Function), recorded in the transaction that answers the message, whatever its outcome:

* a message whose sender and MSH-10 were stored before with *different bytes* (a repeat of the same
  bytes is how HL7 senders recover from a lost ACK, and is no alert; anything else re-uses a control
  ID for another content, which a sender should never do and a replaying attacker would);
* a message replayed from the archive over HTTP (``source.extras["replay_of"]``): re-applying a stored
  message by hand is a restricted function, recorded even when the replay is refused.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from broker.audit.events import Participant, Source
from broker.audit.trail import broker_participant
from broker.domain.auditing import ChangeAudit
from broker.domain.records import Cause
from broker.domain.services import WorklistService
from broker.hl7 import ack
from broker.hl7.errors import APPLICATION_INTERNAL_ERROR, DATA_TYPE_ERROR, MessageError, Problem
from broker.hl7.message import control_problems, may_hold_control_characters, parse, storable
from broker.intake.dispatch import Apply, Context, handler_for
from broker.mapping.charsets import Charset, UnknownCharset, message_charset
from broker.mapping.rules import Mapping, MappingSet
from broker.store.prepared import Prepared
from broker.store.tables import InboundMessage, table_of

log = structlog.get_logger(__name__)
MESSAGES = table_of(InboundMessage)
FRAME_JOINER = b"\x1c"  # separates several replies in inbound_messages.ack; never inside a message
RETRIES = 3
MAX_BATCH = 64  # messages per group commit; more waiting ones go into the next batch
# Whether group commit pays, per database (setting hl7_group_commit: auto).
GROUP_COMMIT_BY_DEFAULT = {"sqlite": True, "postgresql": False}
OUTCOME_STATUS = {"AA": "accepted", "AE": "error", "AR": "rejected"}
# The outcome is recorded only on a row not answered yet: if a concurrent copy of the same message
# (another process, or a repeat that found the row unanswered) got there first, its answer stands.
_RECORD_OUTCOME = Prepared(update(MESSAGES).where(MESSAGES.c.id == bindparam("pk"), MESSAGES.c.ack.is_(None)))
_ORIGINAL = select(MESSAGES.c.id, MESSAGES.c.ack, MESSAGES.c.ack_code, MESSAGES.c.raw).where(
    MESSAGES.c.sender == bindparam("sender"), MESSAGES.c.control_id == bindparam("control_id"),
    MESSAGES.c.duplicate_of_id.is_(None))
_ANSWER_OF = select(MESSAGES.c.ack, MESSAGES.c.ack_code).where(MESSAGES.c.id == bindparam("pk"))
_INSERT_DUPLICATE = insert(MESSAGES)


def _archive_statement(dialect: str) -> Prepared:
    """INSERT of a new archive row that returns no id, instead of failing, for a repeated MSH-10.

    The conflict target is the partial unique index on (sender, control_id) with the index's own
    predicate (an error inside a PostgreSQL transaction would abort it, and the archive rows of a
    batch share one transaction).
    """
    index = next(i for i in MESSAGES.indexes if i.name == "uq_inbound_original")
    make: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = make(MESSAGES).on_conflict_do_nothing(
        index_elements=[MESSAGES.c.sender, MESSAGES.c.control_id],
        index_where=index.dialect_options[dialect]["where"])
    return Prepared(statement.returning(MESSAGES.c.id))


@dataclass(eq=False)
class _Job:
    """One message on its way through a batch: what the batch needs, and what it hands back."""

    raw: bytes
    peer: str
    header: ack.Header
    mapping: Mapping
    charset: Charset | None
    source: Source | None = None  # who asks, for the audit trail (None: the sender at the peer's address)
    archived_id: int | None = None  # our own archive row; None = the MSH-10 was stored before
    # read before the transaction (see _read): the command, or why there is none
    command: Apply | None = None
    refusal: Exception | None = None
    cause_text: str = ""  # what the changes' history says caused them
    event_ref: str = ""  # the message's MSH-10
    # set per attempt of the processing transaction
    message_id: int | None = None  # the row processed: our own, or an earlier unanswered copy
    outcome: str = ""  # AA, AE, AR or "duplicate"
    replies: list[bytes] = field(default_factory=list)
    error: str = ""
    failure: BaseException | None = None  # the message was not answered: the handler raises this
    # group commit hand-over
    finished: bool = False
    wake: threading.Event = field(default_factory=threading.Event)

    @functools.cached_property
    def sender(self) -> str:
        """MSH-3^MSH-4 as the archive stores it (control characters as hex escapes, see ``storable``)."""
        return storable(self.header.sender)[:200]

    @functools.cached_property
    def control_id(self) -> str:
        """MSH-10 as the archive stores it."""
        return storable(self.header.control_id)[:64]

    @functools.cached_property
    def message_type(self) -> str:
        """MSH-9.1^MSH-9.2 as the archive stores it."""
        return storable(f"{self.header.message_type}^{self.header.trigger_event}")[:20]

    @property
    def key(self) -> tuple[str, str] | None:
        """What makes two messages copies of each other (None: never, an empty MSH-10)."""
        control_id = self.control_id
        return (self.sender, control_id) if control_id else None

    def clear(self) -> None:
        """Forget the answer of an attempt that was rolled back."""
        self.outcome, self.replies, self.error = "", [], ""

    def answer(self, outcome: str, replies: list[bytes], error: str = "") -> None:
        self.outcome, self.replies, self.error = outcome, replies, error

    @functools.cached_property
    def requestor(self) -> Source:
        """Who the audit trail names as asking for the message's changes."""
        return self.source or Source(self.sender, peer_host(self.peer), "hl7")


@dataclass
class _Failure:
    """Why applying a message did not produce AA; its changes are rolled back before it is settled."""

    kind: str  # refused, conflict, answered, internal
    error: Exception | None = None


class _Abort(Exception):
    """Leaves a transaction of one message so that its changes are rolled back."""

    def __init__(self, failure: _Failure) -> None:
        super().__init__(failure.kind)
        self.failure = failure


class _Copies:
    """Copies of one message (sender and MSH-10) are handled one after the other in this process.

    A repeat that arrives while the original is still being handled would find it stored but not
    answered, and process it a second time; waiting for the original lets it be answered as a
    duplicate. (Across processes, the outcome is recorded only on an unanswered row: see _record.)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handling: dict[tuple[str, str], threading.Event] = {}

    @contextmanager
    def one_at_a_time(self, key: tuple[str, str] | None) -> Iterator[None]:
        if key is None:
            yield
            return
        while True:
            with self._lock:
                earlier = self._handling.get(key)
                if earlier is None:
                    self._handling[key] = threading.Event()
                    break
            earlier.wait()
        try:
            yield
        finally:
            with self._lock:
                self._handling.pop(key).set()


class _GroupCommit:
    """Leader/follower batching: whoever finds no batch running runs the next one.

    A follower waits until its message is done, or until the leader hands the lead to it (its
    message is still waiting when a batch ends). A leader runs one batch and then hands over, so its
    own connection is not held up by batches of others.
    """

    def __init__(self, run_batch: Any) -> None:
        self._run_batch = run_batch
        self._lock = threading.Lock()
        self._waiting: list[_Job] = []
        self._leading = False

    def submit(self, job: _Job) -> None:
        with self._lock:
            self._waiting.append(job)
            lead = not self._leading
            self._leading = True
        if not lead:
            job.wake.wait()
            if job.finished:
                return
        # This thread leads until its own message is done (past MAX_BATCH others, a later batch).
        while not job.finished:
            batch = self._take()
            try:
                self._run_batch(batch)
            except BaseException as exc:  # pragma: no cover - run_batch settles every failure itself
                for done in batch:
                    if done.failure is None and not done.outcome:
                        done.failure = exc
                raise
            finally:
                for done in batch:
                    done.finished = True
                    if done is not job:
                        done.wake.set()
                if job.finished:
                    with self._lock:
                        self._hand_over()

    def _take(self) -> list[_Job]:
        """The waiting messages, in arrival order."""
        with self._lock:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            return batch

    def _hand_over(self) -> None:
        """Called with the lock held: the first waiting message's thread leads next, or nobody."""
        if self._waiting:
            self._waiting[0].wake.set()
        else:
            self._leading = False


class _KeptConnections:
    """Database connections kept open from one message to the next.

    Taking a connection from SQLAlchemy's pool and returning it costs more CPU than some of the
    message's statements (checkout, reset on return: about 8 % of an order, measured with py-spy),
    and the intake opens two transactions per message. A connection whose transaction failed in the
    database is returned to the pool instead, which resets or discards it.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._idle: list[Connection] = []  # list.append and list.pop are atomic: no lock needed

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction on a kept connection: committed at the end, rolled back on an exception.

        On a connection in autocommit mode there is no transaction, and SQLAlchemy's would only cost
        CPU (2 % of an order's instructions, callgrind): its statements are run as they come."""
        try:
            db = self._idle.pop()
        except IndexError:
            db = self._engine.connect()
        try:
            if getattr(db.connection.dbapi_connection, "autocommit", False) is True:
                yield db  # each statement commits itself (the PostgreSQL archive's engine): nothing to begin
            else:
                with db.begin():
                    yield db
        except BaseException as exc:
            if isinstance(exc, DBAPIError) or db.invalidated:
                db.close()
            else:  # a refusal: its transaction was rolled back, the connection is sound
                self._idle.append(db)
            raise
        self._idle.append(db)

    def close(self) -> None:
        """Return the kept connections to the pool (those in use are kept until their message ends)."""
        while self._idle:
            self._idle.pop().close()


class Intake:
    """The :data:`~broker.hl7.mllp.MessageHandler` of the listener: bytes in, reply frames out."""

    def __init__(self, engine: Engine, mappings: MappingSet, uid_root: str = "",
                 archive_engine: Engine | None = None, *, group_commit: bool | None = None,
                 audit: bool = False, ae_title: str = "BROKER") -> None:
        self.engine = engine
        # audit: the changes are recorded in the audit trail, the broker named by ae_title
        self.audit = audit
        self.ae_title = ae_title
        self._broker: Participant | None = None
        # Archive rows may be committed without their own flush: see make_engine(flush_with_next_commit).
        self.archive_engine = archive_engine or engine
        self.mappings = mappings
        self.uid_root = uid_root
        # SQLite has one writer at a time; its busy handler sleeps up to 100 ms between tries, which
        # showed as a 435 ms p99 with four senders. Threads of this process queue on a lock instead.
        self._writer: AbstractContextManager[object] = (
            threading.Lock() if engine.dialect.name == "sqlite" else nullcontext())
        self._archive = _archive_statement(self.archive_engine.dialect.name)
        self._connections = _KeptConnections(engine)
        self._archive_connections = (
            self._connections if self.archive_engine is engine else _KeptConnections(self.archive_engine))
        if group_commit is None:
            group_commit = GROUP_COMMIT_BY_DEFAULT[engine.dialect.name]
        self._group = _GroupCommit(self._run_batch) if group_commit else None
        self._copies = _Copies()

    @contextmanager
    def _transaction(self, connections: _KeptConnections | None = None) -> Iterator[Connection]:
        """A write transaction, serialised per process on SQLite."""
        with self._writer, (connections or self._connections).begin() as db:
            yield db

    def close(self) -> None:
        """Close the connections kept between messages (the engines stay the caller's)."""
        self._connections.close()
        self._archive_connections.close()

    def __call__(self, raw: bytes, peer: tuple[str, int]) -> list[bytes]:
        return self.handle(raw, f"{peer[0]}:{peer[1]}")

    def handle(self, raw: bytes, peer: str = "", source: Source | None = None) -> list[bytes]:
        """Store, process and answer one message; returns the reply messages to send back.

        ``source``: who asks, for the audit trail, when it is not the sender at ``peer`` (HTTP)."""
        started = time.perf_counter()
        header = ack.Header.from_raw(raw)
        mapping = self.mappings.for_sender(header.sending_application, header.sending_facility)
        job = _Job(raw, peer, header, mapping, self._charset(header, mapping.default_character_set), source)
        self._read(job)
        with self._copies.one_at_a_time(job.key):
            if self._group is None:
                self._run_batch([job])
            else:
                self._group.submit(job)
        if job.failure is not None:
            raise job.failure
        if job.outcome == "duplicate":
            log.info("hl7.duplicate", sender=job.sender, control_id=job.control_id, peer=peer)
        else:
            log.info("hl7.message", message_type=f"{header.message_type}^{header.trigger_event}",
                     control_id=job.control_id, sender=job.sender, outcome=job.outcome, peer=peer,
                     error=job.error or None, ms=round((time.perf_counter() - started) * 1000, 2))
        return job.replies

    def _run_batch(self, jobs: list[_Job]) -> None:
        """Steps 1-4 for every message of ``jobs``; each ends answered or with ``failure`` set."""
        try:
            self._archive_all(jobs)
            if len(jobs) == 1:
                self._process_alone(jobs[0])
            else:
                self._process_together(jobs)
        except Exception as exc:  # the database is unreachable: nobody gets an answer
            for job in jobs:
                job.failure = exc

    # --- 1 and 2: store, recognise repeats ----------------------------------------------------------
    def _archive_all(self, jobs: list[_Job]) -> None:
        """Store every message of the batch in one transaction that does not wait for its flush.

        A repeated MSH-10 conflicts with the partial unique index and stores nothing here
        (``archived_id`` stays None); it is resolved in the processing transaction.
        """
        now = datetime.now()
        rows = [{"peer": job.peer[:100], "sender": job.sender, "control_id": job.control_id,
                 "message_type": job.message_type, "raw": job.raw,
                 "charset": storable(job.header.character_set)[:32], "received_at": now, "status": "received"}
                for job in jobs]
        for attempt in range(RETRIES):
            try:
                with self._transaction(self._archive_connections) as db:
                    for job, row in zip(jobs, rows, strict=True):
                        job.archived_id = self._archive.scalar(db, row)
                return
            except OperationalError as exc:  # busy or restarting database: try again, then give up
                if attempt == RETRIES - 1:
                    raise
                log.warning("hl7.archive_retry", error=type(exc).__name__, attempt=attempt + 1)

    def _resolve_repeat(self, db: Connection, job: _Job) -> bool:
        """For a message whose MSH-10 was stored before: True if answered here as a duplicate.

        An earlier copy that was stored but never answered is processed now in its place.
        """
        job.clear()
        job.message_id = job.archived_id
        if self.audit and job.source is not None and "replay_of" in job.source.extras:
            self._alert(db, job, f"archived HL7 message #{job.source.extras['replay_of']} replayed",
                        f"inbound message #{job.source.extras['replay_of']}")
        if job.archived_id is not None:
            return False
        original = db.execute(_ORIGINAL, {"sender": job.sender, "control_id": job.control_id}).first()
        if original is None:  # pragma: no cover - only a deleted archive row gets here
            raise OperationalError("archive", {}, Exception("the original of a repeated message vanished"))
        if self.audit and bytes(original.raw) != job.raw:
            self._alert(db, job, f"HL7 message {job.control_id} from {job.sender} repeated with other content",
                        f"inbound message #{original.id}")
        if original.ack is None:
            job.message_id = int(original.id)
            return False
        self._answer_as_duplicate(db, job, original.id, original.ack, original.ack_code)
        return True

    def _answer_as_duplicate(self, db: Connection, job: _Job, original_id: int, original_ack: bytes,
                             ack_code: str) -> None:
        now = datetime.now()
        db.execute(_INSERT_DUPLICATE, {
            "peer": job.peer[:100], "sender": job.sender, "control_id": job.control_id,
            "message_type": job.message_type, "raw": job.raw,
            "charset": storable(job.header.character_set)[:32], "received_at": now, "processed_at": now,
            "status": "duplicate", "ack_code": ack_code, "ack": original_ack, "duplicate_of_id": original_id})
        job.answer("duplicate", list(original_ack.split(FRAME_JOINER)) if original_ack else [])

    def _answer_as_repeat(self, db: Connection, job: _Job) -> None:
        """The row was answered meanwhile by a concurrent copy of the message: answer what it answered."""
        assert job.message_id is not None
        answered = db.execute(_ANSWER_OF, {"pk": job.message_id}).one()
        if job.message_id == job.archived_id:  # our own row, processed by a repeat that found it unanswered
            job.answer("duplicate", list(answered.ack.split(FRAME_JOINER)))
        else:
            self._answer_as_duplicate(db, job, job.message_id, answered.ack, answered.ack_code)

    # --- 3 and 4: decode, apply, answer --------------------------------------------------------------
    def _process_alone(self, job: _Job) -> None:
        """One message: its transaction is rolled back when refused, and the outcome recorded after."""
        for attempt in range(RETRIES):
            try:
                with self._transaction() as db:
                    if self._resolve_repeat(db, job):
                        return
                    failure = self._try_apply(db, job)
                    if failure is not None:
                        raise _Abort(failure)
                return
            except _Abort as abort:
                failure = abort.failure
            except (IntegrityError, OperationalError) as exc:
                failure = _Failure("conflict", exc)
            if failure.kind == "conflict" and attempt < RETRIES - 1:
                log.warning("hl7.process_retry", error=type(failure.error).__name__, attempt=attempt + 1)
                continue
            with self._transaction() as db:
                if not self._resolve_repeat(db, job):
                    self._settle(db, job, failure)
            return

    def _process_together(self, jobs: list[_Job]) -> None:
        """A batch: one transaction, a savepoint per message, one commit; retried whole if it fails."""
        for attempt in range(RETRIES):
            try:
                with self._transaction() as db:
                    for job in jobs:
                        self._process_nested(db, job)
                return
            except OperationalError as exc:  # busy or restarting database: the batch again
                failure = _Failure("internal", exc)
                if attempt < RETRIES - 1:
                    log.warning("hl7.process_retry", error=type(exc).__name__, attempt=attempt + 1,
                                batch=len(jobs))
        # As for a single message: record an internal error for each; if even that fails, raise.
        with self._transaction() as db:
            for job in jobs:
                if not self._resolve_repeat(db, job):
                    self._settle(db, job, failure)

    def _process_nested(self, db: Connection, job: _Job) -> None:
        if self._resolve_repeat(db, job):
            return
        for attempt in range(RETRIES):
            savepoint = db.begin_nested()
            failure = self._try_apply(db, job)
            if failure is None:
                savepoint.commit()
                return
            savepoint.rollback()
            job.clear()
            if failure.kind == "conflict" and attempt < RETRIES - 1:
                log.warning("hl7.process_retry", error=type(failure.error).__name__, attempt=attempt + 1)
                continue
            self._settle(db, job, failure)
            return

    def _try_apply(self, db: Connection, job: _Job) -> _Failure | None:
        """Apply the message and record AA; or say why not (the caller rolls back its changes)."""
        try:
            text = self._apply(db, job)
            replies = self._encode(ack.acknowledgements(job.header, "AA", [], text), job.charset)
            if not self._record(db, job, "AA", replies, ""):
                return _Failure("answered")
            job.answer("AA", replies)
            return None
        except MessageError as exc:  # refused
            return _Failure("refused", exc)
        except IntegrityError as exc:  # a concurrent sender created the same patient: try again
            return _Failure("conflict", exc)
        except OperationalError:  # the database, not the message: the whole transaction is lost
            raise
        except Exception as exc:  # a bug must not lose the message or kill the connection
            if exc is not job.refusal:  # (logged when it was raised, in _read)
                log.exception("hl7.internal_error", control_id=job.header.control_id)
            return _Failure("internal", exc)

    def _settle(self, db: Connection, job: _Job, failure: _Failure) -> None:
        """Record the error ACK of a message whose changes were rolled back."""
        if failure.kind == "answered":
            self._answer_as_repeat(db, job)
            return
        if isinstance(failure.error, MessageError):
            outcome = "AR" if failure.error.reject else "AE"
            problems = failure.error.problems
            error = "; ".join(f"{p.code} {p.location}: {p.text}" for p in problems)
        else:
            exc = failure.error or Exception("unknown")
            outcome = "AE"
            problems = [Problem(APPLICATION_INTERNAL_ERROR, f"internal error ({type(exc).__name__}); message stored")]
            error = f"207: {type(exc).__name__}: {exc}"
        replies = self._encode(ack.acknowledgements(job.header, outcome, problems), job.charset)
        if self._record(db, job, outcome, replies, error):
            job.answer(outcome, replies, error)
        else:
            self._answer_as_repeat(db, job)

    def _read(self, job: _Job) -> None:
        """Decode and map the message into its domain command, or note why it is refused."""
        try:
            job.command = self._command(job)
        except MessageError as exc:
            job.refusal = exc
        except Exception as exc:  # a bug: answered AE 207 like one met while applying
            log.exception("hl7.internal_error", control_id=job.header.control_id)
            job.refusal = exc

    def _command(self, job: _Job) -> Apply:
        header, charset, raw = job.header, job.charset, job.raw
        if charset is None:
            raise MessageError([Problem(DATA_TYPE_ERROR, f"unknown character set {header.character_set!r}",
                                        "MSH", 1, 18)], reject=True)
        try:
            text = raw.decode(charset.python_codec)
        except UnicodeDecodeError as exc:
            raise MessageError([Problem(DATA_TYPE_ERROR, f"bytes not valid in {charset.hl7_name} at offset "
                                        f"{exc.start}", "MSH", 1, 18)], reject=True) from exc
        message = parse(text, charset.python_codec)
        if may_hold_control_characters(raw, text, message.delimiters.escape):
            problems = control_problems(message)
            if problems:  # in the header the message cannot even be routed: refused (AR)
                raise MessageError(problems, reject=any(p.segment == "MSH" for p in problems))
        job.cause_text = f"HL7 {'^'.join(message.message_type)} {message.control_id}"
        job.event_ref = message.control_id
        handler = handler_for(message)
        return handler(Context(message, job.mapping, charset, self.uid_root))

    def _apply(self, db: Connection, job: _Job) -> str:
        if job.refusal is not None:
            raise job.refusal
        assert job.command is not None
        cause = Cause(job.cause_text, job.message_id, event_kind="hl7", event_ref=job.event_ref)
        return job.command(WorklistService(db, audit=self._change_audit(job)), cause)

    def _change_audit(self, job: _Job) -> ChangeAudit | None:
        """The audit of the message's changes (None: not recorded)."""
        if not self.audit:
            return None
        if self._broker is None:  # made once: the broker's host name and process do not change
            self._broker = broker_participant(self.ae_title)
        return ChangeAudit(job.requestor, self._broker)

    def _alert(self, db: Connection, job: _Job, reason: str, resource: str) -> None:
        """A Security Alert (Use of Restricted Function) about the message, in the caller's transaction."""
        audit = self._change_audit(job)
        assert audit is not None
        audit.restricted_use(db, reason, resource, datetime.now())

    @staticmethod
    def _record(db: Connection, job: _Job, outcome: str, replies: list[bytes], error: str) -> bool:
        """Store the outcome on the message's row; False if the row was answered already."""
        values = {"status": OUTCOME_STATUS[outcome], "ack_code": outcome, "processed_at": datetime.now(),
                  "ack": FRAME_JOINER.join(replies), "error": storable(error)[:4000]}
        if job.charset is not None:
            values["charset"] = job.charset.hl7_name
        return _RECORD_OUTCOME.rowcount(db, {"pk": job.message_id, **values}) == 1

    @staticmethod
    def _charset(header: ack.Header, default_name: str) -> Charset | None:
        try:
            return message_charset(header.character_set, default_name)
        except UnknownCharset:
            return None

    @staticmethod
    def _encode(messages: list[str], charset: Charset | None) -> list[bytes]:
        codec = charset.python_codec if charset else "ascii"
        return [m.encode(codec, errors="replace") for m in messages]


def peer_host(peer: str) -> str:
    """The address of a ``host:port`` peer (IPv4 or IPv6); '' for one that is no address."""
    host, separator, port = peer.rpartition(":")
    if not separator or not port.isdigit():
        return ""
    return host.strip("[]")
