"""QIDO-RS query parameters -> C-FIND identifier (broker.web.dicomweb.qido): what a DICOMweb client writes
becomes the identifier a modality would send, and everything the search cannot use is refused with why."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from broker.mwl.identifier import parse_identifier
from broker.web.dicomweb.qido import FUZZY_IGNORED, MWL, UPS, QidoError, parse_search, paths_of

SPS = "ScheduledProcedureStepSequence"


def identifier(*params: tuple[str, str], model: object = MWL) -> Dataset:
    return parse_search(params, model).identifier  # type: ignore[arg-type]


def test_default_mwl_identifier_holds_the_typical_modality_return_keys_all_universal() -> None:
    ds = identifier()
    paths = set(paths_of(ds))
    assert {"PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", f"{SPS}.Modality",
            f"{SPS}.ScheduledStationAETitle", f"{SPS}.ScheduledProcedureStepStartDate",
            f"{SPS}.ScheduledProtocolCodeSequence"} <= paths
    query = parse_identifier(ds)
    assert query.conditions == () and query.unsupported_keys == ()


def test_keyword_tag_and_both_dotted_sequence_forms_are_the_same_key() -> None:
    by_keyword = identifier(("PatientID", "P1"), (f"{SPS}.Modality", "CT"))
    by_tag = identifier(("00100020", "P1"), ("00400100.00080060", "CT"))
    mixed = identifier(("00100020", "P1"), (f"{SPS}.00080060", "CT"))
    assert by_keyword == by_tag == mixed
    assert by_keyword.PatientID == "P1"
    assert by_keyword.ScheduledProcedureStepSequence[0].Modality == "CT"
    # the other default keys of the SPS item stay, universal
    assert by_keyword.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == ""


def test_matching_values_keep_their_c_find_meaning() -> None:
    ds = identifier(("PatientName", "DOE*"), (f"{SPS}.ScheduledProcedureStepStartDate", "20261122-20261123"),
                    ("StudyInstanceUID", "1.2.3,1.2.4"))
    query = parse_identifier(ds)
    kinds = {type(c).__name__ for c in query.conditions}
    assert kinds == {"Wildcard", "StartRange", "UidList"}


def test_an_empty_value_is_universal_matching() -> None:
    ds = identifier(("PatientWeight", ""))
    assert ds.PatientWeight == "" and parse_identifier(ds).conditions == ()


def test_non_ascii_values_make_the_identifier_utf_8() -> None:
    ds = identifier(("PatientName", "MÜLLER^ERIKA"))
    assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.PatientName == "MÜLLER^ERIKA"
    assert "SpecificCharacterSet" not in identifier(("PatientName", "MULLER"))


def test_includefield_adds_return_keys_by_keyword_tag_and_path_and_repeats() -> None:
    ds = identifier(("includefield", "PatientWeight,00102000"),
                    ("includefield", f"{SPS}.CommentsOnTheScheduledProcedureStep"))
    paths = set(paths_of(ds))
    assert {"PatientWeight", "MedicalAlerts", f"{SPS}.CommentsOnTheScheduledProcedureStep"} <= paths


def test_includefield_of_a_sequence_returns_it_whole_unless_a_key_inside_matches() -> None:
    whole = identifier(("includefield", SPS))
    assert len(whole.ScheduledProcedureStepSequence) == 0  # zero items: the whole stored sequence
    matched = identifier(("includefield", SPS), (f"{SPS}.Modality", "MR"))
    assert matched.ScheduledProcedureStepSequence[0].Modality == "MR"


def test_includefield_all_asks_for_the_whole_information_model() -> None:
    mwl = identifier(("includefield", "all"))
    assert {"PlacerOrderNumberImagingServiceRequest", "OtherPatientIDsSequence", "PatientWeight"} <= set(paths_of(mwl))
    assert len(mwl.ScheduledProcedureStepSequence) == 0
    ups = identifier(("includefield", "all"), model=UPS)
    assert {"SOPInstanceUID", "ProcedureStepState", "ReasonForCancellation"} <= set(paths_of(ups))
    with pytest.raises(QidoError, match="all"):
        identifier(("includefield", "all"), ("includefield", "PatientID"))


def test_ups_default_keys_are_the_c_find_return_keys() -> None:
    ds = identifier(("ProcedureStepState", "SCHEDULED"), model=UPS)
    assert ds.ProcedureStepState == "SCHEDULED"
    assert {"SOPInstanceUID", "ScheduledProcedureStepStartDateTime", "ReferencedRequestSequence", "PatientID",
            "InputReadinessState"} <= set(paths_of(ds))
    assert "TransactionUID" not in ds


def test_paging_and_flags() -> None:
    query = parse_search([("limit", "25"), ("offset", "50"), ("fuzzymatching", "true"),
                          ("emptyvaluematching", "false")], MWL)
    assert (query.limit, query.offset) == (25, 50)
    assert query.warnings == (FUZZY_IGNORED,)
    assert parse_search([("fuzzymatching", "false")], MWL).warnings == ()
    assert parse_search([], MWL).limit is None and parse_search([], MWL).offset == 0
    assert "multiplevaluematching" in parse_search([("multiplevaluematching", "true")], MWL).warnings[0]


@pytest.mark.parametrize(("params", "reason"), [
    ([("NoSuchKeyword", "1")], "unknown attribute 'NoSuchKeyword'"),
    ([("00091010", "1")], "unknown attribute 00091010"),
    ([("PatientID.Modality", "CT")], "PatientID is not a sequence"),
    ([(SPS, "CT")], "is a sequence"),
    ([("PatientID", "A"), ("00100020", "B")], "PatientID given twice"),
    ([("limit", "-1")], "limit must be an unsigned integer"),
    ([("limit", "0")], "limit must be at least 1"),
    ([("limit", "10"), ("limit", "20")], "limit given twice"),
    ([("offset", "ten")], "offset must be an unsigned integer"),
    ([("fuzzymatching", "yes")], "fuzzymatching must be true or false"),
    ([("includefield", "PatientID,,PatientName")], "includefield: empty attribute"),
    ([("SpecificCharacterSet", "ISO_IR 100")], "not a matching key"),
    ([("00080000", "1")], "not an attribute"),
    ([("PixelData", "1")], "cannot be matched on"),
    ([("PatientWeight", "heavy")], "'heavy' is not a valid DS"),
    ([("StudyInstanceUID", "1.2,,1.3")], "empty UID"),
    ([("NumberOfFrames", "x")], "'x' is not a valid IS"),
    ([("PatientWeight", "72.5"), ("NumberOfFrames", "2")], None),
    ([("PregnancyStatus", "x")], "not a number"),
])
def test_what_cannot_be_used_is_refused_with_the_reason(params: list[tuple[str, str]], reason: str | None) -> None:
    if reason is None:
        parse_search(params, MWL)  # valid: passed on as written, the finder decides (FF01 in C-FIND)
        return
    with pytest.raises(QidoError) as refused:
        parse_search(params, MWL)
    assert reason in str(refused.value)
