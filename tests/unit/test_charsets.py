"""HL7 MSH-18 <-> Python codec <-> DICOM Specific Character Set, and reading MSH-18 from raw bytes."""

from __future__ import annotations

import codecs

import pytest

from broker.hl7.ack import Header
from broker.mapping.charsets import (
    ASCII,
    CHARSETS,
    DEFAULT_CHARSET,
    LATIN_1,
    UTF_8,
    Charset,
    UnknownCharset,
    charset_by_dicom_term,
    charset_for_msh18,
)

# MSH-18 name, Python codec, DICOM Specific Character Set defined term (the project spec's table)
TABLE = [
    ("8859/1", "latin_1", "ISO_IR 100"),
    ("8859/2", "iso8859_2", "ISO_IR 101"),
    ("8859/3", "iso8859_3", "ISO_IR 109"),
    ("8859/4", "iso8859_4", "ISO_IR 110"),
    ("8859/5", "iso8859_5", "ISO_IR 144"),
    ("8859/6", "iso8859_6", "ISO_IR 127"),
    ("8859/7", "iso8859_7", "ISO_IR 126"),
    ("8859/8", "iso8859_8", "ISO_IR 138"),
    ("8859/9", "iso8859_9", "ISO_IR 148"),
    ("8859/15", "iso8859_15", "ISO_IR 203"),
    ("UNICODE UTF-8", "utf_8", "ISO_IR 192"),
    ("ISO IR87", "iso2022_jp", "\\ISO 2022 IR 87"),  # code extension: value 1 empty
    ("ASCII", "ascii", ""),
]


@pytest.mark.parametrize(("hl7_name", "codec", "term"), TABLE)
def test_table_entry(hl7_name: str, codec: str, term: str) -> None:
    charset = charset_for_msh18(hl7_name, ASCII)
    assert charset == Charset(hl7_name, codec, term)


@pytest.mark.parametrize(("hl7_name", "codec", "term"), TABLE)
def test_round_trip(hl7_name: str, codec: str, term: str) -> None:
    charset = charset_for_msh18(hl7_name, ASCII)
    assert charset_by_dicom_term(charset.dicom_term) == charset
    assert charset_for_msh18(charset_by_dicom_term(term).hl7_name, ASCII) == charset
    codecs.lookup(charset.python_codec)  # a codec Python knows


def test_table_covers_every_charset() -> None:
    assert {c.hl7_name for c in CHARSETS} == {row[0] for row in TABLE}


@pytest.mark.parametrize("spelling", ["unicode utf-8", "  UNICODE UTF-8 ", "UNICODE  UTF-8", "UNICODE",
                                      "UTF-8", "utf-8"])
def test_utf8_spellings(spelling: str) -> None:
    assert charset_for_msh18(spelling, ASCII) is UTF_8


@pytest.mark.parametrize("spelling", ["8859/1", " 8859/1 ", "iso ir87", "ascii"])
def test_lookup_ignores_case_and_spaces(spelling: str) -> None:
    assert charset_for_msh18(spelling, UTF_8).hl7_name == " ".join(spelling.split()).upper()


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_msh18_gives_the_default(value: str) -> None:
    assert charset_for_msh18(value, UTF_8) is UTF_8
    assert charset_for_msh18(value, DEFAULT_CHARSET) is LATIN_1


@pytest.mark.parametrize("value", ["8859/99", "KOI8-R", "ISO-8859-1", "GB 18030", "8859"])
def test_unknown_msh18(value: str) -> None:
    with pytest.raises(UnknownCharset, match="MSH-18"):
        charset_for_msh18(value, LATIN_1)
    with pytest.raises(ValueError):
        charset_for_msh18(value, LATIN_1)


def test_default_charset_is_latin_1() -> None:
    assert DEFAULT_CHARSET is LATIN_1
    assert (LATIN_1.hl7_name, LATIN_1.python_codec, LATIN_1.dicom_term) == ("8859/1", "latin_1", "ISO_IR 100")


@pytest.mark.parametrize(("term", "expected"), [
    ("ISO_IR 100", LATIN_1),
    ("iso_ir 100", LATIN_1),
    (" ISO_IR 192 ", UTF_8),
    ("", ASCII),
    ("ISO_IR 6", ASCII),
    ("\\ISO 2022 IR 87", charset_for_msh18("ISO IR87", ASCII)),
    ("ISO 2022 IR 6\\ISO 2022 IR 87", charset_for_msh18("ISO IR87", ASCII)),
])
def test_by_dicom_term(term: str, expected: Charset) -> None:
    assert charset_by_dicom_term(term) == expected


@pytest.mark.parametrize("term", ["ISO_IR 999", "GB18030", "ISO_IR 100\\ISO_IR 192", "8859/1"])
def test_unknown_dicom_term(term: str) -> None:
    with pytest.raises(UnknownCharset):
        charset_by_dicom_term(term)


def test_charset_is_frozen() -> None:
    with pytest.raises(AttributeError):
        LATIN_1.python_codec = "utf_8"  # type: ignore[misc]


def msh18(raw: bytes) -> str:
    """MSH-18 as the intake reads it from undecoded bytes (the ACK header parser)."""
    return Header.from_raw(raw).character_set.strip()


# --- MSH-18 as the intake reads it (before decoding) ---------------------------------------------
V251_UTF8 = ("MSH|^~\\&|RIS|HOSP|WL|RAD|20261123093000||OMI^O23^OMI_O23|C2|P|2.5.1||||||UNICODE UTF-8\r"
             "PID|1||ID1^^^HOSP^MR||NGUYỄN^LINH^^^MS\r"
             "ORC|NW|P2^RIS|F2^RAD||SC\r").encode()
V231_LATIN1 = ("MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||ORM^O01|C1|P|2.3.1||||||8859/1\r"
               "PID|1||ID1^^^HOSP^MR||MÜLLER^ERIKA^A^^FRAU||19700101|F\r").encode("latin-1")


def test_read_msh18_utf8() -> None:
    assert msh18(V251_UTF8) == "UNICODE UTF-8"


def test_read_msh18_latin1_body_not_decoded_as_utf8() -> None:
    assert msh18(V231_LATIN1) == "8859/1"


def test_read_msh18_lf_segment_separators() -> None:
    raw = V231_LATIN1.replace(b"\r", b"\n")
    assert msh18(raw) == "8859/1"


def test_read_msh18_crlf_segment_separators() -> None:
    assert msh18(V251_UTF8.replace(b"\r", b"\r\n")) == "UNICODE UTF-8"


def test_read_msh18_does_not_read_past_msh() -> None:
    # MSH has only 12 fields; the PID line has more than 18 once split on "|" and must not be used.
    raw = (b"MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||ORM^O01|C1|P|2.3.1\n"
           b"PID|1|2|3|4|5|6|7|8|9|10|11|12|13|14|15|16|17|X\n")
    assert msh18(raw) == ""


def test_read_msh18_absent() -> None:
    assert msh18(b"MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||ORM^O01|C1|P|2.3.1\r") == ""


def test_read_msh18_first_repetition_only() -> None:
    raw = b"MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||OMI^O23|C3|P|2.5.1||||||ASCII~ISO IR87|\rPID|1\r"
    assert msh18(raw) == "ASCII"


def test_read_msh18_other_delimiters() -> None:
    raw = b"MSH#$*\\&#RIS#HOSP#WL#RAD#20261123##ORM$O01#C4#P#2.3.1######8859/2*8859/1#\r"
    assert msh18(raw) == "8859/2"


def test_read_msh18_strips_spaces() -> None:
    raw = b"MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||ORM^O01|C5|P|2.3.1|||||| 8859/1 \r"
    assert msh18(raw) == "8859/1"


@pytest.mark.parametrize("prefix", [b"\xef\xbb\xbf", b"  \r\n", b"\x0b", b"\n\xef\xbb\xbf "])
def test_read_msh18_skips_bom_and_whitespace(prefix: bytes) -> None:
    assert msh18(prefix + V251_UTF8) == "UNICODE UTF-8"


@pytest.mark.parametrize("raw", [
    b"",
    b"PID|1||ID1\r",
    b"FHS|^~\\&|RIS\rMSH|^~\\&|RIS|HOSP|WL|RAD|20261123||ORM^O01|C1|P|2.3.1||||||8859/1\r",
    b"MSH",
    b"MSH\r",
    b"garbage MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||ORM^O01|C1|P|2.3.1||||||8859/1\r",
])
def test_read_msh18_not_a_message(raw: bytes) -> None:
    assert msh18(raw) == ""


def test_read_msh18_result_selects_the_codec() -> None:
    charset = charset_for_msh18(msh18(V251_UTF8), DEFAULT_CHARSET)
    assert "NGUYỄN" in V251_UTF8.decode(charset.python_codec)
    charset = charset_for_msh18(msh18(V231_LATIN1), UTF_8)
    assert "MÜLLER" in V231_LATIN1.decode(charset.python_codec)
