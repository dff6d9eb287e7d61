"""The HL7 parser: fields, components, escapes, the explicit null, separators real senders use."""

from __future__ import annotations

import pytest

from broker.hl7.errors import MessageError
from broker.hl7.message import NULL, parse

MSG = ("MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||ORM^O01|C1|P|2.3.1\r"
       "PID|1||ID1^^^HOSP^MR~ID2^^^SSA^SS||DOE^JANE||\"\"|F\r"
       "OBR|1|P1||^^^CODE^Text \\T\\ more\\S\\x^LOCAL|||||||||A\\F\\B\\E\\C\\X41\\\r")


def test_header_fields() -> None:
    m = parse(MSG)
    assert m.message_type == ("ORM", "O01")
    assert m.control_id == "C1" and m.version == "2.3.1" and m.sender == ("RIS", "HOSP")


def test_components_and_repetitions() -> None:
    m = parse(MSG)
    pid = m.first("PID")
    assert m.value(pid, 3) == "ID1"
    assert m.value(pid, 3, 4) == "HOSP"
    assert m.value(pid, 3, 1, repetition=2) == "ID2"
    assert m.value(pid, 5, 2) == "JANE"
    assert m.value(pid, 99) == ""  # absent field
    assert m.value(pid, 5, 9) == ""  # absent component


def test_explicit_null_is_kept_apart_from_empty() -> None:
    m = parse(MSG)
    assert m.value(m.first("PID"), 7) == NULL
    assert m.value(m.first("PID"), 6) == ""


def test_escape_sequences_are_resolved_per_component() -> None:
    m = parse(MSG)
    obr = m.first("OBR")
    assert m.value(obr, 4, 5) == "Text & more^x"
    assert m.value(obr, 13) == "A|B\\CA"


@pytest.mark.parametrize("separator", ["\r", "\n", "\r\n"])
def test_segment_separators_from_real_engines(separator: str) -> None:
    m = parse(MSG.replace("\r", separator))
    assert [s.name for s in m.segments] == ["MSH", "PID", "OBR"]


def test_msh_field_numbers_count_the_separator_as_msh1() -> None:
    m = parse(MSG)
    assert m.value(m.msh, 1) == "|"
    assert m.value(m.msh, 3) == "RIS"


@pytest.mark.parametrize("text", ["", "PID|1", "MSH", "garbage\rMSH|^~\\&|", "MSH|^~\\&|A\rP!D|x",
                                  "MSH|RNER|A|B", "MSH|^^\\&|A|B", "MSH| ~\\&|A|B"])
def test_unusable_messages_are_rejected(text: str) -> None:
    with pytest.raises(MessageError) as info:
        parse(text)
    assert info.value.reject


@pytest.mark.parametrize("text", ["MSH|^~\\|A", "MSH|^~|A|B", "MSH|^~\\a|A", "MSH|^~^\\|A",
                                  "MSH|^~\\\t|A"])
def test_encoding_characters_are_checked_every_time(text: str) -> None:
    # checked once per distinct MSH-1/MSH-2 and remembered: a bad one must still be refused each time
    for _ in range(2):
        with pytest.raises(MessageError) as info:
            parse(text)
        assert info.value.reject


def test_mixed_separators_cut_the_same_segments() -> None:
    m = parse(MSG.replace("\r", "\n", 1))
    assert [s.name for s in m.segments] == ["MSH", "PID", "OBR"]
    assert parse(MSG).segments == m.segments
