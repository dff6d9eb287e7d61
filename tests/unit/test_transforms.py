"""HL7 -> DICOM value transforms: one test per rule and per edge case."""

from __future__ import annotations

import pytest

from broker.mapping.transforms import (
    TransformError,
    clean_cs,
    code_item,
    hl7_date_to_da,
    hl7_ts_to_da_tm,
    is_valid_uid,
    map_value,
    pick_code_triple,
    sex_to_dicom,
    truncate,
    xcn_to_pn,
    xpn_to_pn,
)

PRIORITY = {"S": "STAT", "A": "HIGH", "P": "HIGH", "C": "HIGH", "R": "ROUTINE", "T": "MEDIUM"}


# --- TransformError ----------------------------------------------------------------------------------
def test_transform_error_is_a_value_error_with_a_reason() -> None:
    with pytest.raises(ValueError) as info:
        hl7_date_to_da("1971XXXX")
    assert isinstance(info.value, TransformError)
    assert info.value.reason == "not an HL7 date: '1971XXXX'"
    assert str(info.value) == info.value.reason


# --- hl7_date_to_da ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    ("19700101", "19700101"),
    ("197001011230", "19700101"),  # a TS in a date field: keep the date
    ("19700101123045.1234", "19700101"),
    ("19700101+0100", "19700101"),  # time zone stripped
    ("197001011230-0500", "19700101"),
    ("20240229", "20240229"),  # leap day
    (" 19700101 ", "19700101"),
    ("", ""),
    ("   ", ""),
])
def test_date_to_da(value: str, expected: str) -> None:
    assert hl7_date_to_da(value) == expected


@pytest.mark.parametrize("value", [
    "1971XXXX",
    "1970",  # DICOM DA has no reduced precision
    "197001",
    "20260230",  # not a calendar date
    "20250229",  # not a leap year
    "19701301",
    "00000101",
    "1970-01-01",
    "1970010",
    "19700101+01",  # malformed time zone
    "197001012460",  # minute out of range
    "١٩٧٠٠١٠١",  # non-ASCII digits
])
def test_date_to_da_refuses(value: str) -> None:
    with pytest.raises(TransformError):
        hl7_date_to_da(value)


def test_date_reason_names_missing_precision() -> None:
    with pytest.raises(TransformError, match="YYYYMMDD"):
        hl7_date_to_da("197001")


def test_date_reason_names_calendar() -> None:
    with pytest.raises(TransformError, match="calendar"):
        hl7_date_to_da("20260230")


# --- hl7_ts_to_da_tm -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    ("20261123093000", ("20261123", "093000")),
    ("202611230930", ("20261123", "093000")),  # HHMM padded with seconds
    ("2026112309", ("20261123", "090000")),  # HH padded
    ("20261123", ("20261123", "")),  # date only
    ("20261123093000.5", ("20261123", "093000.5")),
    ("20261123093000.1234", ("20261123", "093000.1234")),
    ("20261123093000.12345678", ("20261123", "093000.123456")),  # TM keeps at most microseconds
    ("20261123093000+0100", ("20261123", "093000")),  # time zone dropped, local time kept
    ("202611230930-0500", ("20261123", "093000")),
    ("20261123235959", ("20261123", "235959")),
    ("20261123000000", ("20261123", "000000")),
    ("", ("", "")),
])
def test_ts_to_da_tm(value: str, expected: tuple[str, str]) -> None:
    assert hl7_ts_to_da_tm(value) == expected


@pytest.mark.parametrize("value", [
    "2026-11-23T09:30",
    "20261123 0930",
    "20261123240000",  # hour out of range
    "20261123096000",  # minute out of range
    "20261123093060",  # second out of range
    "20261123093",  # odd number of time digits
    "2026112309300",
    "20261123093000.",  # fraction point without digits
    "202611230930.5",  # fraction without seconds
    "20261131093000",  # November 31st
    "202611",
    "2026",
    "20261123093000+2500",  # offset out of range
    "20261123093000Z",
])
def test_ts_to_da_tm_refuses(value: str) -> None:
    with pytest.raises(TransformError):
        hl7_ts_to_da_tm(value)


# --- xpn_to_pn / xcn_to_pn -----------------------------------------------------------------------------
@pytest.mark.parametrize(("components", "expected"), [
    (["DOE", "JANE", "Q", "JR", "DR"], "DOE^JANE^Q^DR^JR"),  # prefix and suffix swap places
    (["MÜLLER", "ERIKA", "A", "", "FRAU"], "MÜLLER^ERIKA^A^FRAU"),
    (["NGUYỄN", "LINH", "", "", "MS"], "NGUYỄN^LINH^^MS"),
    (["DOE", "JANE", "", "", ""], "DOE^JANE"),  # trailing empty components removed
    (["DOE"], "DOE"),
    (["DOE", "JOHN", "", "", "", "MD"], "DOE^JOHN^^^MD"),  # degree alone becomes the suffix
    (["DOE", "JOHN", "", "JR", "", "MD"], "DOE^JOHN^^^JR MD"),  # suffix and degree joined
    (["DOE", "JANE", "", "", "", "", "L"], "DOE^JANE"),  # XPN-7 name type ignored
    (["VAN DEN BERG&VAN DEN&BERG", "ANNA"], "VAN DEN BERG^ANNA"),  # v2.5 FN: first subcomponent
    (["", "JANE"], "^JANE"),
    ([], ""),
    (["", "", ""], ""),
    ([" DOE ", " JANE "], "DOE^JANE"),
    (["SMITH^JONES", "A=B"], "SMITH JONES^A B"),  # PN structure characters inside a component
])
def test_xpn_to_pn(components: list[str], expected: str) -> None:
    assert xpn_to_pn(components) == expected


def test_xpn_to_pn_truncates_to_64() -> None:
    result = xpn_to_pn(["F" * 60, "GIVEN"])
    assert result == "F" * 60 + "^GIV"
    assert len(result) == 64


def test_xpn_to_pn_truncation_never_ends_with_a_caret() -> None:
    result = xpn_to_pn(["F" * 63, "GIVEN"])
    assert result == "F" * 63
    assert xpn_to_pn(["F" * 70]) == "F" * 64


@pytest.mark.parametrize(("components", "expected"), [
    (["0815", "HOUSE", "GREGORY", "", "", "DR"], "HOUSE^GREGORY^^DR"),
    (["9", "REQ", "ROBERT"], "REQ^ROBERT"),
    (["7", "PERF", "PAULA", "M", "III", "DR", "PHD", "HOSP", "L"], "PERF^PAULA^M^DR^III PHD"),
    (["0815"], ""),  # an ID only: no name
    ([], ""),
])
def test_xcn_to_pn(components: list[str], expected: str) -> None:
    assert xcn_to_pn(components) == expected


# --- sex_to_dicom --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    ("M", "M"), ("F", "F"), ("O", "O"),
    ("m", "M"), ("f", "F"), (" o ", "O"),  # case-insensitive
    ("A", "O"), ("N", "O"), ("a", "O"),  # ambiguous / not applicable -> other
    ("U", ""), ("", ""), ("X", ""), ("MALE", ""),
])
def test_sex_to_dicom(value: str, expected: str) -> None:
    assert sex_to_dicom(value) == expected


# --- map_value -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    ("S", "STAT"), ("A", "HIGH"), ("P", "HIGH"), ("C", "HIGH"), ("R", "ROUTINE"), ("T", "MEDIUM"),
    ("s", "STAT"),  # case-insensitive fallback
    (" R ", "ROUTINE"),
    ("Q", ""),  # unknown, no default
    ("", ""),
])
def test_map_value(value: str, expected: str) -> None:
    assert map_value(value, PRIORITY) == expected


def test_map_value_default_for_unknown() -> None:
    assert map_value("Q", PRIORITY, "ROUTINE") == "ROUTINE"
    assert map_value("S", PRIORITY, "ROUTINE") == "STAT"


def test_map_value_exact_case_wins() -> None:
    assert map_value("a", {"A": "UPPER", "a": "LOWER"}) == "LOWER"


# --- truncate ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("vr", "limit"), [
    ("AE", 16), ("AS", 4), ("CS", 16), ("DA", 8), ("DS", 16), ("DT", 26), ("IS", 12), ("LO", 64),
    ("LT", 10240), ("SH", 16), ("ST", 1024), ("TM", 14), ("UI", 64),
])
def test_truncate_to_vr_maximum(vr: str, limit: int) -> None:
    assert truncate("X" * (limit + 5), vr) == "X" * limit
    assert truncate("X" * limit, vr) == "X" * limit
    assert truncate("short"[:limit], vr) == "short"[:limit]


@pytest.mark.parametrize("vr", ["UC", "UT", "UR", "XX", "OB", "SQ"])
def test_truncate_unlimited_or_unknown_vr_unchanged(vr: str) -> None:
    value = "X" * 20000
    assert truncate(value, vr) == value


def test_truncate_pn_per_component_group() -> None:
    alphabetic, ideographic = "A" * 70, "B" * 70
    assert truncate(f"{alphabetic}={ideographic}", "PN") == f"{'A' * 64}={'B' * 64}"


def test_truncate_pn_never_ends_with_a_caret() -> None:
    assert truncate("F" * 63 + "^GIVEN", "PN") == "F" * 63


def test_truncate_vr_is_case_insensitive() -> None:
    assert truncate("X" * 20, "sh") == "X" * 16


def test_truncate_counts_characters_not_bytes() -> None:
    assert truncate("Ü" * 20, "SH") == "Ü" * 16


# --- pick_code_triple ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("components", "expected"), [
    (["MRKNEE", "MR KNEE", "LOCAL"], ("MRKNEE", "MR KNEE", "LOCAL")),
    (["", "", "", "CTABD", "CT ABDOMEN", "LOCAL"], ("CTABD", "CT ABDOMEN", "LOCAL")),  # OBR-4 convention
    (["PRI", "PRIMARY", "L", "ALT", "ALTERNATE", "99X"], ("PRI", "PRIMARY", "L")),  # primary wins
    (["MRKNEE"], ("MRKNEE", "", "")),  # missing components
    (["", "", "", "CTABD"], ("CTABD", "", "")),
    (["", "CT ABDOMEN"], ("", "CT ABDOMEN", "")),  # text only: keep the text
    ([], ("", "", "")),
])
def test_pick_code_triple(components: list[str], expected: tuple[str, str, str]) -> None:
    assert pick_code_triple(components) == expected


# --- code_item -----------------------------------------------------------------------------------------
def test_code_item() -> None:
    assert code_item("CTABD", "CT ABDOMEN", "LOCAL") == {
        "CodeValue": "CTABD", "CodingSchemeDesignator": "LOCAL", "CodeMeaning": "CT ABDOMEN"}


def test_code_item_default_scheme() -> None:
    assert code_item("CTABD", "CT ABDOMEN", "") == {
        "CodeValue": "CTABD", "CodingSchemeDesignator": "L", "CodeMeaning": "CT ABDOMEN"}
    item = code_item("CTABD", "CT ABDOMEN", "", default_scheme="99RIS")
    assert item is not None and item["CodingSchemeDesignator"] == "99RIS"


def test_code_item_without_meaning_uses_the_code() -> None:
    item = code_item("CTABD", "", "LOCAL")
    assert item is not None and item["CodeMeaning"] == "CTABD"


@pytest.mark.parametrize("code", ["", "   "])
def test_code_item_none_without_code(code: str) -> None:
    assert code_item(code, "CT ABDOMEN", "LOCAL") is None


def test_code_item_truncates() -> None:
    item = code_item("C" * 20, "M" * 70, "S" * 20)
    assert item == {"CodeValue": "C" * 16, "CodingSchemeDesignator": "S" * 16, "CodeMeaning": "M" * 64}


# --- is_valid_uid --------------------------------------------------------------------------------------
@pytest.mark.parametrize("uid", [
    "1.2.3.4",
    "1.2.840.10008.1.2.1",
    "0",
    "1.0.2",
    "2.25.329800735698586629295641978511506172918",
    "1." + "2" * 62,  # exactly 64
])
def test_valid_uid(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", [
    "",
    "1.2.03",  # leading zero
    "01.2",
    "1..2",  # empty component
    ".1.2",
    "1.2.",
    "1.2.a",
    "1.2.3 ",
    "1.2.3\n",
    "1-2-3",
    "1." + "2" * 63,  # 65 characters
    "1.٢.3",  # non-ASCII digit
])
def test_invalid_uid(uid: str) -> None:
    assert not is_valid_uid(uid)


# --- clean_cs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    ("CT", "CT"),
    ("mr", "MR"),  # upper-cased
    ("MR_AE 1", "MR_AE 1"),
    (" CT ", "CT"),
    ("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "ABCDEFGHIJKLMNOP"),  # truncated to 16
    ("", ""),
])
def test_clean_cs(value: str, expected: str) -> None:
    assert clean_cs(value) == expected


@pytest.mark.parametrize("value", ["C-T", "CT/MR", "ÉCHO", "CT.1", "CT\\MR"])
def test_clean_cs_refuses(value: str) -> None:
    with pytest.raises(TransformError, match="code string"):
        clean_cs(value)
