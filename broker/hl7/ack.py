"""Acknowledgements: MSA + one ERR segment per problem, in the version and character set of the message.

Original mode (MSH-15/16 empty): one ACK with AA, AE or AR. Enhanced mode: an accept ACK (CA/CE/CR)
when MSH-15 asks for it, then an application ACK (AA/AE/AR) when MSH-16 asks for it; both are sent
only after the change is committed, so even the accept ACK means "stored and processed".
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field
from datetime import datetime

from broker.hl7.errors import ERROR_TEXT, Problem
from broker.hl7.message import Delimiters, Message, escape, parse

_counter = itertools.count(1)


@dataclass(frozen=True)
class Header:
    """What an ACK needs from the inbound MSH; read even from a message that fails to parse."""

    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    control_id: str = ""
    message_type: str = ""
    trigger_event: str = ""
    processing_id: str = "P"
    version: str = "2.5.1"
    accept_ack_type: str = ""  # MSH-15
    application_ack_type: str = ""  # MSH-16
    character_set: str = ""  # MSH-18 as sent
    delimiters: Delimiters = field(default_factory=Delimiters)

    @property
    def sender(self) -> str:
        """MSH-3^MSH-4: the key under which MSH-10 must be unique."""
        return f"{self.sending_application}^{self.sending_facility}"

    @property
    def enhanced(self) -> bool:
        return bool(self.accept_ack_type or self.application_ack_type)

    @classmethod
    def from_message(cls, message: Message) -> Header:
        msh = message.msh
        v = message.value
        return cls(v(msh, 3), v(msh, 4), v(msh, 5), v(msh, 6), v(msh, 10), v(msh, 9, 1), v(msh, 9, 2),
                   v(msh, 11) or "P", v(msh, 12) or "2.5.1", v(msh, 15).upper(), v(msh, 16).upper(),
                   v(msh, 18), message.delimiters)

    @classmethod
    def from_raw(cls, raw: bytes) -> Header:
        """Best effort from undecoded bytes: the MSH segment read as Latin-1 (MSH is ASCII by rule)."""
        head = raw.lstrip(b"\xef\xbb\xbf \t\r\n\x0b")
        line = head.split(b"\r", 1)[0].split(b"\n", 1)[0]  # up to the first CR or LF
        try:
            return cls.from_message(parse(line.decode("latin-1")))
        except Exception:
            return cls()


def new_control_id() -> str:
    """A unique MSH-10 for our ACKs (at most 20 characters, the v2.3.1 length)."""
    return f"A{int(time.time() * 1000) % 10**12}{next(_counter) % 10**6:06d}"[:20]


@functools.lru_cache(maxsize=16)
def _escape_table(d: Delimiters) -> dict[int, str] | None:
    """:func:`_escape` as one ``str.translate`` table; None when two delimiters are the same character
    (never from :func:`parse`, which refuses that), where only the replacements in turn give the result."""
    table = {ord(d.escape): f"{d.escape}E{d.escape}"}
    for char, code in ((d.field, "F"), (d.component, "S"), (d.subcomponent, "T"), (d.repetition, "R")):
        table[ord(char)] = f"{d.escape}{code}{d.escape}"
    if len(table) != 5 or ord("\r") in table or ord("\n") in table:
        return None
    # A control character (an MSH-10 carrying NUL, echoed in MSA-2) goes out as its hex escape: the ACK
    # itself then holds none, and the sender's value is still recognisable.
    controls = {c: f"{d.escape}X{c:02X}{d.escape}" for c in (*range(0x20), 0x7F) if c not in table}
    return controls | table | {ord("\r"): " ", ord("\n"): " "}


def _escape(text: str, d: Delimiters) -> str:
    # An ACK escapes about ten values: one pass over each instead of seven replace() calls.
    table = _escape_table(d)
    if table is not None:
        return text.translate(table)
    return escape(text, d)


def _version_at_least_25(version: str) -> bool:
    parts = [*version.split("."), "0", "0"][:2]
    try:
        return (int(parts[0]), int(parts[1])) >= (2, 5)
    except ValueError:
        return True


def err_segment(problem: Problem, header: Header) -> str:
    """One ERR segment: v2.5+ uses ERR-2 (location), ERR-3 (code), ERR-4 (severity), ERR-8 (text);
    earlier versions put location and code in ERR-1 (ELD)."""
    d = header.delimiters
    f, c, s = d.field, d.component, d.subcomponent
    label = ERROR_TEXT.get(problem.code, "Error")
    detail = _escape(problem.text, d)
    if _version_at_least_25(header.version):
        location = ""
        if problem.segment:
            parts = [problem.segment, str(problem.sequence), str(problem.field or ""), "1" if problem.field else "",
                     str(problem.component or "")]
            location = c.join(parts).rstrip(c)
        code = c.join([problem.code, _escape(label, d), "HL70357"])
        return f"ERR{f}{f}{location}{f}{code}{f}E{f}{f}{f}{f}{detail}"
    location = c.join([problem.segment, str(problem.sequence), str(problem.field or "")]) if problem.segment else ""
    code = s.join([problem.code, _escape(f"{label}: {problem.text}", d).replace(s, " "), "HL70357"])
    return f"ERR{f}{location}{c}{code}" if location else f"ERR{f}{c}{c}{c}{code}"


def build_ack(header: Header, code: str, problems: list[Problem], text: str = "",
              now: datetime | None = None) -> str:
    """An ACK message (segments joined by CR) answering ``header`` with MSA-1 ``code``."""
    d = header.delimiters
    f = d.field
    encoding = f"{d.component}{d.repetition}{d.escape}{d.subcomponent}"
    stamp = (now or datetime.now()).strftime("%Y%m%d%H%M%S")
    table = _escape_table(d)  # looked up once for the ten values escaped here

    def esc(value: str) -> str:
        return value.translate(table) if table is not None else _escape(value, d)

    trigger = header.trigger_event
    msh = f.join([
        "MSH", encoding, esc(header.receiving_application or "WLBROKER"), esc(header.receiving_facility),
        esc(header.sending_application), esc(header.sending_facility), stamp, "",
        f"ACK{d.component}{esc(trigger)}{d.component}ACK" if trigger else "ACK",
        new_control_id(), esc(header.processing_id), esc(header.version),
        "", "", "", "", "", esc(header.character_set),
    ]).rstrip(f)
    msa_text = text or "; ".join(p.text for p in problems)
    msa = f.join(["MSA", code, esc(header.control_id), esc(msa_text[:80])]).rstrip(f)
    segments = [msh, msa, *(err_segment(p, header) for p in problems)]
    return "\r".join(segments) + "\r"


def ack_condition(condition: str, success: bool) -> bool:
    """Whether an enhanced-mode ACK of type ``condition`` (AL, NE, ER, SU) is due."""
    condition = condition or "AL"
    return condition == "AL" or (condition == "ER" and not success) or (condition == "SU" and success)


def acknowledgements(header: Header, outcome: str, problems: list[Problem], text: str = "") -> list[str]:
    """The ACK message(s) for an outcome AA/AE/AR, honouring MSH-15/MSH-16."""
    if not header.enhanced:
        return [build_ack(header, outcome, problems, text)]
    success = outcome == "AA"
    replies = []
    if ack_condition(header.accept_ack_type, success):
        replies.append(build_ack(header, "C" + outcome[1], problems, text))
    if header.application_ack_type and ack_condition(header.application_ack_type, success):
        replies.append(build_ack(header, outcome, problems, text))
    return replies
