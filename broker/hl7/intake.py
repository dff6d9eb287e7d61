"""HL7 intake: store the raw message, recognise repeats, apply it in one transaction, answer.

The order of operations is what makes "nothing lost" true:

1. The raw bytes are committed to ``inbound_messages`` before anything else (a crash after this
   leaves a ``received`` row that is processed when the sender repeats the message).
2. A repeat of a processed MSH-10 from the same sender (MSH-3^MSH-4) is stored as a duplicate and
   answered with the original ACK; nothing else changes.
3. The message is decoded, mapped and applied; the domain changes and the ACK are committed in one
   transaction; only then is the ACK returned to the connection.
4. A refused message is rolled back and its error ACK committed to the archive.

When the database cannot be reached the handler raises, the MLLP server closes the connection
without an answer, and the sender (which got no ACK) sends again later.
"""

from __future__ import annotations

import time
from datetime import datetime

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from broker.domain.services import Cause, WorklistService
from broker.hl7 import ack
from broker.hl7.dispatch import Context, handler_for
from broker.hl7.errors import APPLICATION_INTERNAL_ERROR, DATA_TYPE_ERROR, MessageError, Problem
from broker.hl7.message import parse
from broker.mapping.charsets import Charset, UnknownCharset, charset_by_dicom_term, charset_for_msh18
from broker.mapping.rules import MappingSet
from broker.store.tables import InboundMessage

log = structlog.get_logger(__name__)
FRAME_JOINER = b"\x1c"  # separates several replies in InboundMessage.ack; never inside a message
RETRIES = 3


class Intake:
    """The :data:`~broker.hl7.mllp.MessageHandler` of the listener: bytes in, reply frames out."""

    def __init__(self, sessions: sessionmaker[Session], mappings: MappingSet, uid_root: str = "") -> None:
        self.sessions = sessions
        self.mappings = mappings
        self.uid_root = uid_root

    def __call__(self, raw: bytes, peer: tuple[str, int]) -> list[bytes]:
        return self.handle(raw, f"{peer[0]}:{peer[1]}")

    def handle(self, raw: bytes, peer: str = "") -> list[bytes]:
        started = time.perf_counter()
        header = ack.Header.from_raw(raw)
        archived = self._archive(raw, peer, header)
        if isinstance(archived, list):
            log.info("hl7.duplicate", sender=header.sender, control_id=header.control_id, peer=peer)
            return archived
        outcome, status, replies, error = self._process(raw, header, archived)
        log.info("hl7.message", message_type=f"{header.message_type}^{header.trigger_event}",
                 control_id=header.control_id, sender=header.sender, outcome=outcome, status=status,
                 peer=peer, error=error or None, ms=round((time.perf_counter() - started) * 1000, 2))
        return replies

    # --- 1 and 2: store, recognise repeats ----------------------------------------------------------
    def _archive(self, raw: bytes, peer: str, header: ack.Header) -> int | list[bytes]:
        """The id of the stored message, or the original replies for a repeat."""
        for attempt in range(RETRIES):
            try:
                with self.sessions.begin() as session:
                    original = None
                    if header.control_id:
                        original = session.scalars(select(InboundMessage).where(
                            InboundMessage.sender == header.sender[:200],
                            InboundMessage.control_id == header.control_id[:64],
                            InboundMessage.duplicate_of_id.is_(None))).one_or_none()
                    if original is not None and original.ack is not None:
                        session.add(InboundMessage(
                            received_at=datetime.now(), processed_at=datetime.now(), peer=peer[:100],
                            sender=header.sender[:200], control_id=header.control_id[:64],
                            message_type=original.message_type, raw=raw, charset=original.charset,
                            status="duplicate", ack_code=original.ack_code, ack=original.ack,
                            duplicate_of_id=original.id))
                        return original.ack.split(FRAME_JOINER) if original.ack else []
                    if original is not None:  # stored earlier but never answered: process it now
                        return original.id
                    row = InboundMessage(received_at=datetime.now(), peer=peer[:100],
                                         sender=header.sender[:200], control_id=header.control_id[:64],
                                         message_type=f"{header.message_type}^{header.trigger_event}"[:20],
                                         raw=raw, charset=header.character_set[:32], status="received")
                    session.add(row)
                    session.flush()
                    return row.id
            except (IntegrityError, OperationalError) as exc:
                # A concurrent copy of the same MSH-10 won the unique index, or the database is busy.
                if attempt == RETRIES - 1:
                    raise
                log.warning("hl7.archive_retry", error=type(exc).__name__, attempt=attempt + 1)
        raise AssertionError("unreachable")

    # --- 3 and 4: decode, apply, answer --------------------------------------------------------------
    def _process(self, raw: bytes, header: ack.Header, message_id: int) -> tuple[str, str, list[bytes], str]:
        mapping = self.mappings.for_sender(header.sending_application, header.sending_facility)
        charset = self._charset(header, mapping.default_character_set)
        for attempt in range(RETRIES):
            try:
                with self.sessions.begin() as session:
                    row = session.get_one(InboundMessage, message_id)
                    try:
                        # A savepoint, so that a refused message leaves no partial change behind
                        # while its error ACK is still committed with the archive row.
                        with session.begin_nested():
                            outcome, text, problems = self._apply(raw, header, charset, mapping, session, row)
                    except MessageError as exc:
                        outcome, text, problems = ("AR" if exc.reject else "AE"), "", exc.problems
                    status = {"AA": "accepted", "AE": "error", "AR": "rejected"}[outcome]
                    replies = self._encode(ack.acknowledgements(header, outcome, problems, text), charset)
                    row.status, row.ack_code, row.processed_at = status, outcome, datetime.now()
                    row.ack = FRAME_JOINER.join(replies)
                    row.error = "; ".join(f"{p.code} {p.location}: {p.text}" for p in problems)[:4000]
                    row.charset = charset.hl7_name if charset else row.charset
                return outcome, status, replies, row.error
            except (IntegrityError, OperationalError) as exc:
                if attempt == RETRIES - 1:
                    return self._internal_error(header, charset, message_id, exc)
                log.warning("hl7.process_retry", error=type(exc).__name__, attempt=attempt + 1)
            except Exception as exc:  # a bug must not lose the message or kill the connection
                log.exception("hl7.internal_error", control_id=header.control_id)
                return self._internal_error(header, charset, message_id, exc)
        raise AssertionError("unreachable")

    def _apply(self, raw: bytes, header: ack.Header, charset: Charset | None, mapping: object,
               session: Session, row: InboundMessage) -> tuple[str, str, list[Problem]]:
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
        context = Context(message, mapping, charset, self.uid_root,  # type: ignore[arg-type]
                          WorklistService(session),
                          Cause(f"HL7 {'^'.join(message.message_type)} {message.control_id}", row.id))
        summary = handler(context)
        return "AA", summary, []

    def _charset(self, header: ack.Header, default_name: str) -> Charset | None:
        try:
            default = charset_for_msh18(default_name, charset_by_dicom_term("ISO_IR 100"))
            return charset_for_msh18(header.character_set, default)
        except UnknownCharset:
            return None

    @staticmethod
    def _encode(messages: list[str], charset: Charset | None) -> list[bytes]:
        codec = charset.python_codec if charset else "ascii"
        return [m.encode(codec, errors="replace") for m in messages]

    def _internal_error(self, header: ack.Header, charset: Charset | None, message_id: int,
                        exc: Exception) -> tuple[str, str, list[bytes], str]:
        problem = Problem(APPLICATION_INTERNAL_ERROR, f"internal error ({type(exc).__name__}); message stored")
        replies = self._encode(ack.acknowledgements(header, "AE", [problem]), charset)
        with self.sessions.begin() as session:
            row = session.get_one(InboundMessage, message_id)
            row.status, row.ack_code, row.processed_at = "error", "AE", datetime.now()
            row.ack = FRAME_JOINER.join(replies)
            row.error = f"207: {type(exc).__name__}: {exc}"[:4000]
        return "AE", "error", replies, row.error
