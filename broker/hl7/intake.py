"""HL7 intake: store the raw message, recognise repeats, apply it in one transaction, answer.

The order of operations is what makes "nothing lost" true:

1. The raw bytes are committed to ``inbound_messages`` before anything else (a crash after this
   leaves a ``received`` row that is processed when the sender repeats the message).
2. A repeat of a processed MSH-10 from the same sender (MSH-3^MSH-4) is stored as a duplicate and
   answered with the original ACK; nothing else changes.
3. The message is decoded, mapped and applied; the domain changes and the ACK are committed in one
   transaction; only then is the ACK returned to the connection.
4. A refused message changes nothing (its transaction is rolled back); its error ACK is committed to
   the archive row in a transaction of its own.

When the database cannot be reached the handler raises, the MLLP server closes the connection
without an answer, and the sender (which got no ACK) sends again later.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime

import structlog
from sqlalchemy import Connection, Engine, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from broker.domain.services import Cause, WorklistService
from broker.hl7 import ack
from broker.hl7.dispatch import Context, handler_for
from broker.hl7.errors import APPLICATION_INTERNAL_ERROR, DATA_TYPE_ERROR, MessageError, Problem
from broker.hl7.message import parse
from broker.mapping.charsets import Charset, UnknownCharset, message_charset
from broker.mapping.rules import Mapping, MappingSet
from broker.store.tables import InboundMessage, table_of

log = structlog.get_logger(__name__)
MESSAGES = table_of(InboundMessage)
FRAME_JOINER = b"\x1c"  # separates several replies in inbound_messages.ack; never inside a message
RETRIES = 3
OUTCOME_STATUS = {"AA": "accepted", "AE": "error", "AR": "rejected"}
_INSERT_MESSAGE = insert(MESSAGES).returning(MESSAGES.c.id)
_RECORD_OUTCOME = update(MESSAGES).where(MESSAGES.c.id == bindparam("pk"))


class Intake:
    """The :data:`~broker.hl7.mllp.MessageHandler` of the listener: bytes in, reply frames out."""

    def __init__(self, engine: Engine, mappings: MappingSet, uid_root: str = "",
                 archive_engine: Engine | None = None) -> None:
        self.engine = engine
        # Archive rows may be committed without their own flush: see make_engine(flush_with_next_commit).
        self.archive_engine = archive_engine or engine
        self.mappings = mappings
        self.uid_root = uid_root
        # SQLite has one writer at a time; its busy handler sleeps up to 100 ms between tries, which
        # showed as a 435 ms p99 with four senders. Threads of this process queue on a lock instead.
        self._writer: AbstractContextManager[object] = (
            threading.Lock() if engine.dialect.name == "sqlite" else nullcontext())

    @contextmanager
    def _transaction(self, engine: Engine | None = None) -> Iterator[Connection]:
        """A write transaction, serialised per process on SQLite."""
        with self._writer, (engine or self.engine).begin() as db:
            yield db

    def __call__(self, raw: bytes, peer: tuple[str, int]) -> list[bytes]:
        return self.handle(raw, f"{peer[0]}:{peer[1]}")

    def handle(self, raw: bytes, peer: str = "") -> list[bytes]:
        """Store, process and answer one message; returns the reply messages to send back."""
        started = time.perf_counter()
        header = ack.Header.from_raw(raw)
        archived = self._archive(raw, peer, header)
        if isinstance(archived, list):
            log.info("hl7.duplicate", sender=header.sender, control_id=header.control_id, peer=peer)
            return archived
        outcome, replies, error = self._process(raw, header, archived)
        log.info("hl7.message", message_type=f"{header.message_type}^{header.trigger_event}",
                 control_id=header.control_id, sender=header.sender, outcome=outcome, peer=peer,
                 error=error or None, ms=round((time.perf_counter() - started) * 1000, 2))
        return replies

    # --- 1 and 2: store, recognise repeats ----------------------------------------------------------
    def _archive(self, raw: bytes, peer: str, header: ack.Header) -> int | list[bytes]:
        """The id of the stored message, or the original replies for a repeat.

        The common case is one INSERT: the partial unique index on (sender, control_id) refuses a
        second original with the same MSH-10, and only then is the original looked up.
        """
        row = {"peer": peer[:100], "sender": header.sender[:200], "control_id": header.control_id[:64],
               "message_type": f"{header.message_type}^{header.trigger_event}"[:20], "raw": raw,
               "charset": header.character_set[:32]}
        for attempt in range(RETRIES):
            try:
                with self._transaction(self.archive_engine) as db:
                    pk: int = db.execute(_INSERT_MESSAGE, {"received_at": datetime.now(), "status": "received",
                                                           **row}).scalar_one()
                    return pk
            except IntegrityError:
                with self._transaction() as db:
                    original = db.execute(select(MESSAGES).where(
                        MESSAGES.c.sender == row["sender"], MESSAGES.c.control_id == row["control_id"],
                        MESSAGES.c.duplicate_of_id.is_(None))).first()
                    if original is None:  # pragma: no cover - the conflicting row was rolled back meanwhile
                        continue
                    if original.ack is None:  # stored earlier but never answered: process it now
                        return int(original.id)
                    now = datetime.now()
                    db.execute(insert(MESSAGES).values(
                        received_at=now, processed_at=now, status="duplicate", ack_code=original.ack_code,
                        ack=original.ack, duplicate_of_id=original.id, **row))
                    return list(original.ack.split(FRAME_JOINER)) if original.ack else []
            except OperationalError as exc:  # busy or restarting database: try again, then give up
                if attempt == RETRIES - 1:
                    raise
                log.warning("hl7.archive_retry", error=type(exc).__name__, attempt=attempt + 1)
        raise OperationalError("archive", {}, Exception("message could not be stored"))

    # --- 3 and 4: decode, apply, answer --------------------------------------------------------------
    def _process(self, raw: bytes, header: ack.Header, message_id: int) -> tuple[str, list[bytes], str]:
        mapping = self.mappings.for_sender(header.sending_application, header.sending_facility)
        charset = self._charset(header, mapping.default_character_set)
        for attempt in range(RETRIES):
            try:
                with self._transaction() as db:
                    text = self._apply(db, raw, header, charset, mapping, message_id)
                    replies = self._encode(ack.acknowledgements(header, "AA", [], text), charset)
                    self._record(db, message_id, "AA", replies, "", charset)
                return "AA", replies, ""
            except MessageError as exc:  # refused: the transaction above was rolled back
                outcome = "AR" if exc.reject else "AE"
                problems = exc.problems
                replies = self._encode(ack.acknowledgements(header, outcome, problems), charset)
                error = "; ".join(f"{p.code} {p.location}: {p.text}" for p in problems)
                with self._transaction() as db:
                    self._record(db, message_id, outcome, replies, error, charset)
                return outcome, replies, error
            except (IntegrityError, OperationalError) as exc:
                # A concurrent sender created the same patient, or the database was busy: try again.
                if attempt == RETRIES - 1:
                    return self._internal_error(header, charset, message_id, exc)
                log.warning("hl7.process_retry", error=type(exc).__name__, attempt=attempt + 1)
            except Exception as exc:  # a bug must not lose the message or kill the connection
                log.exception("hl7.internal_error", control_id=header.control_id)
                return self._internal_error(header, charset, message_id, exc)
        raise AssertionError("unreachable")

    def _apply(self, db: Connection, raw: bytes, header: ack.Header, charset: Charset | None,
               mapping: Mapping, message_id: int) -> str:
        if charset is None:
            raise MessageError([Problem(DATA_TYPE_ERROR, f"unknown character set {header.character_set!r}",
                                        "MSH", 1, 18)], reject=True)
        try:
            text = raw.decode(charset.python_codec)
        except UnicodeDecodeError as exc:
            raise MessageError([Problem(DATA_TYPE_ERROR, f"bytes not valid in {charset.hl7_name} at offset "
                                        f"{exc.start}", "MSH", 1, 18)], reject=True) from exc
        message = parse(text)
        handler = handler_for(message)
        cause = Cause(f"HL7 {'^'.join(message.message_type)} {message.control_id}", message_id)
        return handler(Context(message, mapping, charset, self.uid_root, WorklistService(db), cause))

    @staticmethod
    def _record(db: Connection, message_id: int, outcome: str, replies: list[bytes], error: str,
                charset: Charset | None) -> None:
        values = {"status": OUTCOME_STATUS[outcome], "ack_code": outcome, "processed_at": datetime.now(),
                  "ack": FRAME_JOINER.join(replies), "error": error[:4000]}
        if charset is not None:
            values["charset"] = charset.hl7_name
        db.execute(_RECORD_OUTCOME, {"pk": message_id, **values})

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

    def _internal_error(self, header: ack.Header, charset: Charset | None, message_id: int,
                        exc: Exception) -> tuple[str, list[bytes], str]:
        problem = Problem(APPLICATION_INTERNAL_ERROR, f"internal error ({type(exc).__name__}); message stored")
        replies = self._encode(ack.acknowledgements(header, "AE", [problem]), charset)
        error = f"207: {type(exc).__name__}: {exc}"
        with self._transaction() as db:
            self._record(db, message_id, "AE", replies, error, charset)
        return "AE", replies, error
