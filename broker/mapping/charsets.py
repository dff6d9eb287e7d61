"""HL7 MSH-18 character sets: the Python codec to decode a message and the DICOM Specific Character Set.

One table ties the three names together so that the bytes we decode, the ACK we encode and the
Specific Character Set (0008,0005) we put on worklist items always agree. No I/O.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = [
    "ASCII",
    "CHARSETS",
    "DEFAULT_CHARSET",
    "LATIN_1",
    "UTF_8",
    "Charset",
    "UnknownCharset",
    "charset_by_dicom_term",
    "charset_for_msh18",
    "message_charset",
]


@dataclass(frozen=True)
class Charset:
    """One character set under its three names."""

    hl7_name: str  # as it is written back in MSH-18 of our ACKs (HL7 table 0211)
    python_codec: str  # e.g. "latin_1", "utf_8", "iso2022_jp", "ascii"
    dicom_term: str  # Specific Character Set defined term, "" for the default repertoire (ISO_IR 6)


class UnknownCharset(ValueError):
    """A character set name that is not in the table: the message cannot be decoded safely."""


ASCII = Charset("ASCII", "ascii", "")
LATIN_1 = Charset("8859/1", "latin_1", "ISO_IR 100")
UTF_8 = Charset("UNICODE UTF-8", "utf_8", "ISO_IR 192")

CHARSETS: tuple[Charset, ...] = (
    ASCII,
    LATIN_1,
    Charset("8859/2", "iso8859_2", "ISO_IR 101"),
    Charset("8859/3", "iso8859_3", "ISO_IR 109"),
    Charset("8859/4", "iso8859_4", "ISO_IR 110"),
    Charset("8859/5", "iso8859_5", "ISO_IR 144"),
    Charset("8859/6", "iso8859_6", "ISO_IR 127"),
    Charset("8859/7", "iso8859_7", "ISO_IR 126"),
    Charset("8859/8", "iso8859_8", "ISO_IR 138"),
    Charset("8859/9", "iso8859_9", "ISO_IR 148"),
    Charset("8859/15", "iso8859_15", "ISO_IR 203"),
    UTF_8,
    # Code extension: value 1 empty (ASCII) and value 2 the Kanji set (PS3.3 C.12.1.1.2).
    Charset("ISO IR87", "iso2022_jp", "\\ISO 2022 IR 87"),
)

# ISO 8859-1 is what HL7 feeds in Europe send when MSH-18 is empty; a mapping file can choose another.
DEFAULT_CHARSET: Charset = LATIN_1


def _key(name: str) -> str:
    return " ".join(name.split()).upper()


_BY_HL7: dict[str, Charset] = {_key(c.hl7_name): c for c in CHARSETS}
# Spellings seen in the field for UTF-8 that HL7 table 0211 does not list exactly.
_BY_HL7 |= {"UNICODE": UTF_8, "UTF-8": UTF_8}
_BY_DICOM: dict[str, Charset] = {_key(c.dicom_term.split("\\")[-1]): c for c in CHARSETS}
_BY_DICOM["ISO_IR 6"] = ASCII
_DICOM_DEFAULT_REPERTOIRE = {"", "ISO 2022 IR 6"}


def charset_for_msh18(value: str, default: Charset) -> Charset:
    """The character set named by MSH-18; ``default`` when MSH-18 is empty.

    Case and surrounding spaces are ignored. An unknown name raises :class:`UnknownCharset` instead of
    falling back: decoding with a guessed codec would store misspelt patient names without any error.
    """
    if not value.strip():
        return default
    try:
        return _BY_HL7[_key(value)]
    except KeyError:
        raise UnknownCharset(f"unknown HL7 character set (MSH-18): {value[:40]!r}") from None


@functools.lru_cache(maxsize=64)
def message_charset(msh18: str, default_name: str) -> Charset:
    """The character set of a message: MSH-18, else the mapping's ``default_character_set``.

    Raises :class:`UnknownCharset` when either names no known set (not remembered: each such message
    looks again). Remembered per pair, since a sender names the same set in every message.
    """
    return charset_for_msh18(msh18, charset_for_msh18(default_name, DEFAULT_CHARSET))


def charset_by_dicom_term(term: str) -> Charset:
    """The character set for a DICOM Specific Character Set value, for configuration ("ISO_IR 100").

    Besides the single defined terms, the code-extension spellings of the Japanese set used by DICOM
    ("\\ISO 2022 IR 87", "ISO 2022 IR 6\\ISO 2022 IR 87") are accepted; "" and "ISO_IR 6" are ASCII.
    """
    values = [_key(v) for v in term.split("\\")]
    if len(values) == 2 and values[0] in _DICOM_DEFAULT_REPERTOIRE:
        values = values[1:]
    if len(values) == 1 and values[0] in _BY_DICOM:
        return _BY_DICOM[values[0]]
    raise UnknownCharset(f"unknown DICOM Specific Character Set: {term[:40]!r}")


