"""Parsing of HL7 v2 (ER7) messages into a lazy segment/field accessor.

Measured on this project's machine: python-hl7's ``parse`` builds the full tree of every field and
costs about 1 ms per ORM^O01, hl7apy about 9 ms. The broker only reads a few dozen fields of each
message, so it splits segments and fields once and components on demand (about 30 us per message).
HL7 semantics are kept: ``""`` is the explicit null ("clear the value"), escape sequences are
resolved per component, LF or CRLF segment separators from some engines are accepted.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from broker.hl7.errors import DATA_TYPE_ERROR, SEGMENT_SEQUENCE_ERROR, MessageError, Problem

NULL = '""'  # HL7's explicit null: the receiver must clear the value.

# Control characters no field may hold, sent as the byte or as an \Xhh\ escape: C0 except TAB, CR and LF
# (CR and LF end segments, \.br\ gives CR LF), and DEL. PostgreSQL text cannot store NUL at all, and
# DICOM strings allow none of them in names and codes; one rule for both databases.
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])

_SEGMENT_SPLIT = re.compile(r"\r\n|\r|\n")
_SEGMENT_NAME = re.compile(r"^[A-Z][A-Z0-9]{2}$")


@dataclass(frozen=True)
class Delimiters:
    """The encoding characters of MSH-1/MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"


_STANDARD = Delimiters()


@dataclass
class Segment:
    """One segment; ``fields[n]`` is field n (for MSH, ``fields[1]`` is the field separator)."""

    name: str
    fields: list[str]

    def raw(self, number: int) -> str:
        """The raw (escaped) text of field ``number``, all repetitions; '' when absent."""
        return self.fields[number] if number < len(self.fields) else ""


def _nth(text: str, separator: str, n: int) -> str | None:
    """The ``n``-th (from 1) part of ``text`` cut at ``separator``; None when it has fewer parts. The
    first part, by far the most asked for, is split off alone."""
    if n == 1:
        return text.split(separator, 1)[0]
    parts = text.split(separator)
    return parts[n - 1] if len(parts) >= n else None


@dataclass
class Message:
    """A parsed HL7 message: segments in order plus the delimiters needed to read their fields."""

    segments: list[Segment]
    delimiters: Delimiters = field(default_factory=Delimiters)
    # The message's character set (MSH-18): the bytes of a \Xhh..\ escape are characters in it.
    codec: str = "latin_1"

    # --- reading ---------------------------------------------------------------------------------
    def first(self, name: str) -> Segment | None:
        """The first segment called ``name``."""
        for segment in self.segments:
            if segment.name == name:
                return segment
        return None

    def all(self, name: str) -> list[Segment]:
        """Every segment called ``name``, in order."""
        return [s for s in self.segments if s.name == name]

    def repetitions(self, segment: Segment | None, number: int) -> list[str]:
        """The raw repetitions of a field."""
        if segment is None:
            return []
        value = segment.raw(number)
        if segment.name == "MSH" and number == 2:
            return [value]
        return value.split(self.delimiters.repetition) if value else []

    def components(self, raw_repetition: str) -> list[str]:
        """Unescaped components of one repetition (subcomponents left joined by '&')."""
        if raw_repetition == NULL:
            return [NULL]
        if self.delimiters.escape not in raw_repetition:  # most: nothing to resolve in any component
            return raw_repetition.split(self.delimiters.component)
        return [self.unescape(c) for c in raw_repetition.split(self.delimiters.component)]

    def value(self, segment: Segment | None, number: int, component: int = 1, subcomponent: int = 0,
              repetition: int = 1) -> str:
        """One unescaped value: ``''`` when absent, ``'""'`` (NULL) when the sender cleared it.

        The mapping reads a few dozen values per message, mostly the first repetition's first
        component: that case splits off only the part it needs instead of every repetition and
        component (same result as :meth:`repetitions` then :meth:`components`), without a call
        to :func:`_nth` (about 40 values per message, each of which took two or three calls).
        """
        if segment is None:
            return ""
        fields = segment.fields
        if number >= len(fields):
            return ""
        text = fields[number]
        if not text:
            return ""
        d = self.delimiters
        if segment.name == "MSH" and number == 2:  # the encoding characters: one repetition
            if repetition > 1:
                return ""
        elif repetition == 1:
            text = text.split(d.repetition, 1)[0]
        else:
            picked = _nth(text, d.repetition, repetition)
            if picked is None:
                return ""
            text = picked
        if text == NULL:
            return NULL
        if component == 1:
            text = text.split(d.component, 1)[0]
        else:
            picked = _nth(text, d.component, component)
            if picked is None:
                return ""
            text = picked
        if subcomponent == 1:
            text = text.split(d.subcomponent, 1)[0]
        elif subcomponent:
            text = _nth(text, d.subcomponent, subcomponent) or ""
        return text if text == NULL or d.escape not in text else self.unescape(text)

    def subcomponents(self, raw_component: str) -> list[str]:
        """The unescaped subcomponents of one raw (still escaped) component.

        Split at the real subcomponent separator before escapes are resolved, so an escaped one
        (``\\T\\``) stays a literal ``&`` inside its subcomponent: ``SMITH\\T\\JONES`` is one
        subcomponent ``SMITH&JONES``, ``VAN&DER&BERG`` three.
        """
        if raw_component == NULL:
            return [NULL]
        parts = raw_component.split(self.delimiters.subcomponent)
        return parts if self.delimiters.escape not in raw_component else [self.unescape(p) for p in parts]

    def unescape(self, text: str) -> str:
        """Resolve HL7 escape sequences (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh\\ \\.br\\ ...)."""
        esc = self.delimiters.escape
        if esc not in text:
            return text
        out: list[str] = []
        i = 0
        while i < len(text):
            ch = text[i]
            end = text.find(esc, i + 1) if ch == esc else -1
            if ch != esc or end < 0:
                out.append(ch)
                i += 1
                continue
            code = text[i + 1:end]
            out.append(self._escape_value(code))
            i = end + 1
        return "".join(out)

    def _escape_value(self, code: str) -> str:
        d = self.delimiters
        simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": d.escape,
                  ".br": "\r\n"}
        if code in simple:
            return simple[code]
        if code.startswith("X") and len(code) > 1:
            try:
                return bytes.fromhex(code[1:]).decode(self.codec, errors="replace")  # U+FFFD shows a bad byte
            except ValueError:
                return ""
        # Highlighting (\H\ \N\), character-set switches (\C..\ \M..\) and formatting carry no text.
        return ""

    # --- header shortcuts ------------------------------------------------------------------------
    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def message_type(self) -> tuple[str, str]:
        """(MSH-9.1, MSH-9.2), e.g. ("ORM", "O01")."""
        return self.value(self.msh, 9, 1), self.value(self.msh, 9, 2)

    @property
    def control_id(self) -> str:
        return self.value(self.msh, 10)

    @property
    def version(self) -> str:
        return self.value(self.msh, 12)

    @property
    def sender(self) -> tuple[str, str]:
        """(MSH-3.1 sending application, MSH-4.1 sending facility)."""
        return self.value(self.msh, 3), self.value(self.msh, 4)


@functools.lru_cache(maxsize=64)
def _delimiters(chosen: str) -> Delimiters | None:
    """The delimiters of MSH-1 + MSH-2 (``chosen``), None when they are not five distinct characters
    that are neither letters, digits nor white space. Senders keep theirs, so each message (and the
    ACK header read before it) finds them checked and built already."""
    if len(chosen) != 5 or len(set(chosen)) != 5 or any(c.isalnum() or c.isspace() for c in chosen) \
            or CONTROL_CHARACTERS.search(chosen):
        return None
    return Delimiters(*chosen)


def parse(text: str, codec: str = "latin_1") -> Message:
    """Split a decoded message into segments; raises :class:`MessageError` (AR) without a usable MSH.
    ``codec`` is the Python codec ``text`` was decoded with (for ``\\Xhh\\`` escapes)."""
    text = text.lstrip("\ufeff \t\r\n\x0b")
    if not text.startswith("MSH") or len(text) < 8:
        raise MessageError([Problem(SEGMENT_SEQUENCE_ERROR, "message does not start with an MSH segment",
                                    "MSH")], reject=True)
    sep = text[3]
    delimiters = _delimiters(sep + text[4:8].split(sep, 1)[0])
    if delimiters is None:
        raise MessageError([Problem(SEGMENT_SEQUENCE_ERROR, "MSH-1/MSH-2 encoding characters are invalid",
                                    "MSH", 1, 2)], reject=True)
    segments: list[Segment] = []
    # CR alone is the standard separator: str.split then cuts the same segments as the regular expression.
    for line in text.split("\r") if "\n" not in text else _SEGMENT_SPLIT.split(text):
        if not line.strip():
            continue
        parts = line.split(sep)
        if parts[0] == "MSH":
            parts = ["MSH", sep, *parts[1:]]
        if not _SEGMENT_NAME.match(parts[0]):
            raise MessageError([Problem(SEGMENT_SEQUENCE_ERROR, f"invalid segment name {parts[0][:3]!r}",
                                        parts[0][:3], len(segments) + 1)], reject=True)
        segments.append(Segment(parts[0], parts))
    return Message(segments, delimiters, codec)


def escape(text: str, d: Delimiters = _STANDARD) -> str:
    """``text`` as HL7 field content: each delimiter as its escape (``&`` -> ``\\T\\``), each control
    character as its hex escape (``\\X00\\``), CR and LF as spaces. For every value the broker writes
    into an HL7 message of its own (status messages to the RIS, the messages built from HTTP requests);
    :func:`Message.unescape` gives the text back."""
    out = text.replace(d.escape, f"{d.escape}E{d.escape}")
    for char, code in ((d.field, "F"), (d.component, "S"), (d.subcomponent, "T"), (d.repetition, "R")):
        if char in out:
            out = out.replace(char, f"{d.escape}{code}{d.escape}")
    return _hex_escaped(out.replace("\r", " ").replace("\n", " "), d.escape)


def _hex_escaped(text: str, escape: str) -> str:
    """``text`` with each control character as its HL7 hex escape (``\\X00\\``)."""
    if CONTROL_CHARACTERS.search(text) is None:
        return text
    return CONTROL_CHARACTERS.sub(lambda m: f"{escape}X{ord(m.group()):02X}{escape}", text)


def may_hold_control_characters(raw: bytes, text: str, escape: str) -> bool:
    """Whether :func:`control_problems` must look: a control byte, or an ``\\X`` hex escape, is present.

    One pass over the bytes (``bytes.translate`` deleting the control bytes, about 1 us for an order) and
    one substring search: the common message costs no walk over its fields. Every character set the
    broker decodes keeps control characters as single bytes below 0x20; ISO 2022 messages carry ESC and
    always take the closer look, which finds nothing in their decoded text.
    """
    return len(raw.translate(None, _CONTROL_BYTES)) != len(raw) or f"{escape}X" in text


def control_problems(message: Message, limit: int = 10) -> list[Problem]:
    """An ERR 102 for each field (at most ``limit``) whose value holds a control character.

    Each component is checked as the mapping would read it, escape sequences resolved, so ``\\X00\\``
    is found like the byte itself. The problem names the segment, its sequence, the field and (for a
    field with components) the component; its text names the character but never the value.
    """
    problems: list[Problem] = []
    d = message.delimiters
    counts: dict[str, int] = {}
    for segment in message.segments:
        counts[segment.name] = sequence = counts.get(segment.name, 0) + 1
        for number in range(1, len(segment.fields)):
            text = segment.fields[number]
            if (segment.name == "MSH" and number < 3) or not text:
                continue
            for repetition in text.split(d.repetition):
                components = repetition.split(d.component)
                found = next(((index, hit) for index, component in enumerate(components, start=1)
                              if (hit := CONTROL_CHARACTERS.search(message.unescape(component)))), None)
                if found is None:
                    continue
                index, hit = found
                problems.append(Problem(DATA_TYPE_ERROR, f"control character U+{ord(hit.group()):04X} is not "
                                        "allowed in a field value", segment.name, sequence, number,
                                        index if len(components) > 1 else 0))
                break
            if len(problems) >= limit:
                return problems
    return problems


def storable(text: str) -> str:
    """``text`` with each control character as its HL7 hex escape (``\\X00\\``), for the archive's text
    columns (sender, control ID, message type, error): PostgreSQL text cannot hold NUL, and SQLite
    stores the same. The raw bytes themselves are kept unchanged in the binary ``raw`` column."""
    return _hex_escaped(text, _STANDARD.escape)
