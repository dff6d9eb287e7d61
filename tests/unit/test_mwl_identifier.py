"""Reading a worklist C-FIND identifier: conditions, return keys, unsupported keys, refusals (no database)."""

from __future__ import annotations

from datetime import datetime
from io import BytesIO
from typing import Any

import pytest
from pydicom import Dataset, Sequence
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag

from broker.domain.worklist_item import index_columns
from broker.mwl.identifier import (
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    SPS_KEYS,
    TOP_LEVEL_KEYS,
    UNABLE_TO_PROCESS,
    AnyOf,
    DateRange,
    IdentifierError,
    ReturnKey,
    SingleValue,
    StartRange,
    TimeOfDayRange,
    UidList,
    Wildcard,
    WorklistQuery,
    parse_identifier,
)
from broker.mwl.matching import normalise_pn
from broker.mwl.responses import dataset_from_json, response_character_set

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")  # queries hold '*', ranges, ...


def query(sps: dict[str, Any] | None = None, **top: Any) -> WorklistQuery:
    dataset = Dataset()
    for keyword, value in top.items():
        setattr(dataset, keyword, value)
    if sps is not None:
        item = Dataset()
        for keyword, value in sps.items():
            setattr(item, keyword, value)
        dataset.ScheduledProcedureStepSequence = [item]
    return parse_identifier(dataset)


def refusal(sps: dict[str, Any] | None = None, **top: Any) -> IdentifierError:
    with pytest.raises(IdentifierError) as caught:
        query(sps, **top)
    return caught.value


def start(date: str = "", time: str = "") -> Any:
    [condition] = query({"ScheduledProcedureStepStartDate": date, "ScheduledProcedureStepStartTime": time}).conditions
    return condition


# --- single values, wildcards, lists, universal ----------------------------------------------------
def test_single_value_and_wildcard() -> None:
    got = query({"ScheduledStationAETitle": "CT01", "Modality": "CT"}, PatientID="MRN1", AccessionNumber="A?C*")
    assert set(got.conditions) == {
        SingleValue(SPS_KEYS["ScheduledStationAETitle"], "CT01"),
        SingleValue(SPS_KEYS["Modality"], "CT"),
        SingleValue(TOP_LEVEL_KEYS["PatientID"], "MRN1"),
        Wildcard(TOP_LEVEL_KEYS["AccessionNumber"], "A?C*"),
    }
    assert got.unsupported_keys == () and not got.optional_keys_unsupported


def test_zero_length_and_lone_star_are_universal() -> None:
    got = query({"ScheduledStationAETitle": "", "Modality": "*", "ScheduledProcedureStepStartDate": "*"},
                PatientName="**", PatientID="", StudyInstanceUID="*")
    assert got.conditions == ()
    assert [k.keyword for k in got.return_keys] == ["PatientName", "PatientID", "StudyInstanceUID",
                                                    "ScheduledProcedureStepSequence"]


def test_padding_spaces_are_not_part_of_the_value() -> None:
    assert query({"ScheduledStationAETitle": " CT01 "}).conditions == (
        SingleValue(SPS_KEYS["ScheduledStationAETitle"], "CT01"),)


def test_uid_list() -> None:
    got = query(StudyInstanceUID=["1.2.3", "1.2.4", "1.2.3"])
    assert got.conditions == (UidList(TOP_LEVEL_KEYS["StudyInstanceUID"], ("1.2.3", "1.2.4")),)
    assert query(StudyInstanceUID="1.2.3").conditions == (SingleValue(TOP_LEVEL_KEYS["StudyInstanceUID"], "1.2.3"),)


def test_pn_trailing_carets_dropped_and_groups_are_alternatives() -> None:
    key = TOP_LEVEL_KEYS["PatientName"]
    assert query(PatientName="DOE^JANE^^").conditions == (SingleValue(key, "DOE^JANE"),)
    assert query(PatientName="Yamada^Tarou=山田^太郎*").conditions == (
        AnyOf(key, (SingleValue(key, "Yamada^Tarou"), Wildcard(key, "山田^太郎*"))),)
    assert query(PatientName="=山田^太郎").conditions == (SingleValue(key, "山田^太郎"),)
    assert query(PatientName="*=山田").conditions == ()  # one group universal: the key is


def test_pn_normalisation_is_the_stored_one() -> None:
    # The query side must upper-case exactly as index_columns does, including non-ASCII letters.
    name = "müller^straße^éva"
    item = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]}}
    assert index_columns(item)["patient_name_norm"] == normalise_pn(name)


def test_birth_date_single_and_range() -> None:
    key = TOP_LEVEL_KEYS["PatientBirthDate"]
    assert query(PatientBirthDate="19620412").conditions == (SingleValue(key, "19620412"),)
    assert query(PatientBirthDate="19600101-19701231").conditions == (DateRange(key, "19600101", "19701231"),)
    assert query(PatientBirthDate="-19701231").conditions == (DateRange(key, None, "19701231"),)
    assert query(PatientBirthDate="19600101-").conditions == (DateRange(key, "19600101", None),)


# --- SPS start date and time ----------------------------------------------------------------------
def test_date_alone_is_whole_days() -> None:
    assert start("20261123") == StartRange(datetime(2026, 11, 23), datetime(2026, 11, 24))
    assert start("20261122-20261123") == StartRange(datetime(2026, 11, 22), datetime(2026, 11, 24))
    assert start("-20261123") == StartRange(None, datetime(2026, 11, 24))
    assert start("20261123-") == StartRange(datetime(2026, 11, 23), None)


def test_date_and_time_are_one_range() -> None:
    # PS3.4 C.2.2.2.5.1: from the first date at the first time to the last date at the last time
    # (to the end of the minute written).
    assert start("20261122-20261123", "0800-1700") == StartRange(datetime(2026, 11, 22, 8),
                                                                   datetime(2026, 11, 23, 17, 1))
    assert start("20261122-20261123", "2200-0600") == StartRange(datetime(2026, 11, 22, 22),
                                                                   datetime(2026, 11, 23, 6, 1))
    assert start("20261123", "0930") == StartRange(datetime(2026, 11, 23, 9, 30), datetime(2026, 11, 23, 9, 31))
    assert start("20261123", "09") == StartRange(datetime(2026, 11, 23, 9), datetime(2026, 11, 23, 10))
    assert start("20261123", "093015.5") == StartRange(datetime(2026, 11, 23, 9, 30, 15),
                                                       datetime(2026, 11, 23, 9, 30, 16))
    assert start("20261123", "2359") == StartRange(datetime(2026, 11, 23, 23, 59), datetime(2026, 11, 24))
    assert start("20261123-", "0800-1700") == StartRange(datetime(2026, 11, 23, 8), None)
    assert start("-20261123", "0800-1700") == StartRange(None, datetime(2026, 11, 23, 17, 1))
    assert start("20261123", "-1200") == StartRange(datetime(2026, 11, 23), datetime(2026, 11, 23, 12, 1))


def test_time_alone_is_a_time_of_day_range() -> None:
    assert start(time="0800-1700") == TimeOfDayRange("080000", "170059")
    assert start(time="1200") == TimeOfDayRange("120000", "120059")
    assert start(time="-0800") == TimeOfDayRange(None, "080059")
    assert start(time="22-") == TimeOfDayRange("220000", None)
    across = start(time="2200-0600")
    assert across == TimeOfDayRange("220000", "060059") and across.crosses_midnight


def test_combined_range_ending_before_it_starts_is_refused() -> None:
    error = refusal({"ScheduledProcedureStepStartDate": "20261123", "ScheduledProcedureStepStartTime": "1700-0800"})
    assert error.status == UNABLE_TO_PROCESS
    assert error.offending == (Tag("ScheduledProcedureStepStartTime"),)


# --- return keys and sequences --------------------------------------------------------------------
def test_return_key_tree_in_tag_order() -> None:
    code = Dataset()
    code.CodeValue = ""
    code.CodingSchemeDesignator = ""
    got = query({"ScheduledProcedureStepID": "", "ScheduledProtocolCodeSequence": [code], "Modality": ""},
                ReferencedStudySequence=Sequence(), PatientName="")
    sps = ReturnKey(Tag("ScheduledProcedureStepSequence"), "ScheduledProcedureStepSequence", "SQ", (
        ReturnKey(Tag("Modality"), "Modality", "CS"),
        ReturnKey(Tag("ScheduledProtocolCodeSequence"), "ScheduledProtocolCodeSequence", "SQ", (
            ReturnKey(Tag("CodeValue"), "CodeValue", "SH"),
            ReturnKey(Tag("CodingSchemeDesignator"), "CodingSchemeDesignator", "SH"))),
        ReturnKey(Tag("ScheduledProcedureStepID"), "ScheduledProcedureStepID", "SH")))
    assert got.return_keys == (
        ReturnKey(Tag("ReferencedStudySequence"), "ReferencedStudySequence", "SQ", None),
        ReturnKey(Tag("PatientName"), "PatientName", "PN"),
        sps,
    )


@pytest.mark.parametrize("sequence", [Sequence(), Sequence([Dataset()])], ids=["zero-length", "empty-item"])
def test_empty_sps_sequence_is_universal_and_asks_for_all_of_it(sequence: Sequence) -> None:
    dataset = Dataset()
    dataset.ScheduledProcedureStepSequence = sequence
    got = parse_identifier(dataset)
    assert got.conditions == ()
    assert got.return_keys == (ReturnKey(Tag("ScheduledProcedureStepSequence"), "ScheduledProcedureStepSequence",
                                         "SQ", None),)


def test_sps_keys_are_only_matched_inside_the_sps_item() -> None:
    # Modality at the top level is not the step's modality: unsupported there, not a condition.
    got = query(Modality="CT")
    assert got.conditions == () and got.unsupported_keys == ("Modality",)


# --- unsupported keys -----------------------------------------------------------------------------
def test_unsupported_keys_are_collected_with_their_path() -> None:
    code = Dataset()
    code.CodeValue = "CTABD"
    code.CodeMeaning = ""
    got = query({"ScheduledStationAETitle": "CT01", "ScheduledProtocolCodeSequence": [code],
                 "ScheduledProcedureStepDescription": "CT*"},
                RequestedProcedurePriority="STAT", PatientWeight="")
    assert got.unsupported_keys == ("ScheduledProcedureStepSequence>ScheduledProcedureStepDescription",
                                    "ScheduledProcedureStepSequence>ScheduledProtocolCodeSequence>CodeValue",
                                    "RequestedProcedurePriority")
    assert got.optional_keys_unsupported
    assert got.conditions == (SingleValue(SPS_KEYS["ScheduledStationAETitle"], "CT01"),)
    # still returned
    assert "RequestedProcedurePriority" in [k.keyword for k in got.return_keys]


def test_private_keys_are_not_returned_and_flag_only_with_a_value() -> None:
    dataset = Dataset()
    dataset.add_new(0x00091010, "LO", "")
    assert parse_identifier(dataset) == WorklistQuery()
    dataset.add_new(0x00091011, "LO", "x")
    got = parse_identifier(dataset)
    assert got.return_keys == () and got.unsupported_keys == ("(0009,1011)",)


def test_query_retrieve_level_is_ignored() -> None:
    assert query(QueryRetrieveLevel="WORKLIST") == WorklistQuery()


# --- refusals -------------------------------------------------------------------------------------
def test_sps_sequence_with_two_items_is_a900() -> None:
    dataset = Dataset()
    dataset.ScheduledProcedureStepSequence = [Dataset(), Dataset()]
    with pytest.raises(IdentifierError) as caught:
        parse_identifier(dataset)
    assert caught.value.status == IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS == 0xA900
    assert caught.value.offending == (Tag("ScheduledProcedureStepSequence"),)
    assert "one item" in caught.value.comment


def test_other_sequence_with_two_items_is_a900() -> None:
    assert refusal(ReferencedStudySequence=[Dataset(), Dataset()]).status == IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS


def test_sequence_sent_as_a_value_is_a900() -> None:
    dataset = Dataset()
    dataset.add_new(Tag("ScheduledProcedureStepSequence"), "LO", "CT01")
    with pytest.raises(IdentifierError) as caught:
        parse_identifier(dataset)
    assert caught.value.status == IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS


@pytest.mark.parametrize(("sps", "top"), [
    ({"ScheduledProcedureStepStartDate": "2026-11-23"}, {}),  # ISO, not DA
    ({"ScheduledProcedureStepStartDate": "20261123-20261122"}, {}),  # reversed
    ({"ScheduledProcedureStepStartDate": "20261131"}, {}),  # no such day
    ({"ScheduledProcedureStepStartDate": "2026112*"}, {}),  # wildcard in a DA
    ({"ScheduledProcedureStepStartDate": "20261101-20261102-20261103"}, {}),
    ({"ScheduledProcedureStepStartDate": "-"}, {}),
    ({"ScheduledProcedureStepStartTime": "25"}, {}),
    ({"ScheduledProcedureStepStartTime": "09:30"}, {}),
    ({"ScheduledProcedureStepStartTime": "0960"}, {}),
    ({}, {"PatientBirthDate": "1962"}),
    ({}, {"PatientBirthDate": "19700101-19600101"}),
    ({}, {"StudyInstanceUID": "1.2.*"}),
    ({}, {"StudyInstanceUID": "1.2.abc"}),
    ({"Modality": ["CT", "MR"]}, {}),  # several values where one is matched
], ids=lambda v: repr(v))
def test_malformed_values_are_unable_to_process(sps: dict[str, Any], top: dict[str, Any]) -> None:
    error = refusal(sps, **top)
    assert error.status == UNABLE_TO_PROCESS == 0xC000
    assert error.offending and len(error.comment) <= 64 and error.comment.isascii()


def test_error_comment_is_short_ascii() -> None:
    error = IdentifierError("PatientName: not valid " + "ü" * 100)
    assert len(error.comment) == 64 and error.comment.isascii() and str(error) == error.comment


# --- character sets -------------------------------------------------------------------------------
def _wire(dataset: Dataset) -> Dataset:
    """Encode as a modality would (in the dataset's character set) and read back as pynetdicom does."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, dataset)
    return read_dataset(BytesIO(out.getvalue()), is_implicit_VR=True, is_little_endian=True)


@pytest.mark.parametrize(("charset", "name"), [
    ("ISO_IR 100", "MÜLLER^ERIKA"),
    ("ISO_IR 192", "NGUYỄN^LINH"),
    (["", "ISO 2022 IR 87"], "山田^太郎"),
    ("ISO_IR 144", "ИВАНОВ^ИВАН"),
])
def test_query_text_is_decoded_with_its_character_set(charset: Any, name: str) -> None:
    dataset = Dataset()
    dataset.SpecificCharacterSet = charset
    dataset.PatientName = name
    item = Dataset()
    item.ScheduledPerformingPhysicianName = name + "*"
    dataset.ScheduledProcedureStepSequence = [item]
    got = parse_identifier(_wire(dataset))
    assert got.character_set == ((charset,) if isinstance(charset, str) else tuple(charset))
    assert set(got.conditions) == {SingleValue(TOP_LEVEL_KEYS["PatientName"], name),
                                   Wildcard(SPS_KEYS["ScheduledPerformingPhysicianName"], name + "*")}


def test_unknown_character_set_is_refused() -> None:
    dataset = Dataset()
    dataset.SpecificCharacterSet = "KLINGON"
    dataset.PatientName = "DOE"
    with pytest.raises(IdentifierError) as caught:
        parse_identifier(dataset)
    assert caught.value.status == UNABLE_TO_PROCESS
    assert caught.value.offending == (Tag("SpecificCharacterSet"),)


@pytest.mark.filterwarnings("ignore:Failed to decode byte string")
def test_text_invalid_in_its_character_set_is_refused() -> None:
    dataset = Dataset()
    dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.PatientName = "X"
    raw = DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, True
    write_dataset(raw, dataset)
    broken = raw.getvalue().replace(b"X ", b"\xff\xfe")
    with pytest.raises(IdentifierError) as caught:
        parse_identifier(read_dataset(BytesIO(broken), is_implicit_VR=True, is_little_endian=True))
    assert caught.value.status == UNABLE_TO_PROCESS and "PatientName" in caught.value.comment


# --- the response's character set (pure; the responses themselves are tested on the databases) ------
@pytest.mark.parametrize(("stored", "texts", "expected"), [
    ("ISO_IR 100", ["MÜLLER^ERIKA", "CT01"], "ISO_IR 100"),
    ("ISO_IR 100", ["山田^太郎"], "ISO_IR 192"),
    ("", ["DOE^JANE"], ""),
    ("", ["MÜLLER"], "ISO_IR 192"),
    ("\\ISO 2022 IR 87", ["山田^太郎", "CT"], "\\ISO 2022 IR 87"),
    ("\\ISO 2022 IR 87", ["MÜLLER"], "ISO_IR 192"),
    ("ISO_IR 192", ["山田", "MÜLLER"], "ISO_IR 192"),
    ("KLINGON", ["DOE"], "ISO_IR 192"),
])
def test_response_character_set(stored: str, texts: list[str], expected: str) -> None:
    assert response_character_set(stored, texts) == expected


def test_fast_json_reader_agrees_with_pydicom() -> None:
    # The responses are built by dataset_from_json; pydicom's own reader is the reference.
    item = {
        "00080005": {"vr": "CS", "Value": [None, "ISO 2022 IR 87"]},
        "00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY"]},
        "00080090": {"vr": "PN"},
        "00081060": {"vr": "PN", "Value": [{"Alphabetic": "A^B"}, {"Alphabetic": "C^D"}]},
        "00081110": {"vr": "SQ"},
        "00081120": {"vr": "SQ", "Value": []},
        "00091010": {"vr": "OB", "InlineBinary": "AAEC"},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎",
                                             "Phonetic": "やまだ^たろう"}]},
        "00101030": {"vr": "DS", "Value": [70.5]},
        "00200010": {"vr": "SH"},
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "00201208": {"vr": "IS", "Value": [3]},
        "00280010": {"vr": "US", "Value": [512]},
        "00400100": {"vr": "SQ", "Value": [{
            "00080060": {"vr": "CS", "Value": ["CT"]},
            "00400002": {"vr": "DA", "Value": ["20261123"]},
            "00400008": {"vr": "SQ", "Value": [{"00080100": {"vr": "SH", "Value": ["X"]}}, {}]},
        }]},
    }
    fast, reference = dataset_from_json(item), Dataset.from_json(item)
    assert fast == reference
    assert [(e.tag, e.VR) for e in fast] == [(e.tag, e.VR) for e in reference]
    assert fast.to_json_dict() == reference.to_json_dict()
