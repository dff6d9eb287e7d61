"""One test per mapping rule of mappings/default.yaml, plus station AE rules, UID policy, overrides."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from broker.dicom_json import tag_of, value
from broker.domain.worklist_item import step_item
from broker.hl7.errors import MessageError
from broker.hl7.message import parse
from broker.mapping.charsets import charset_by_dicom_term, charset_for_msh18
from broker.mapping.engine import Mapper
from broker.mapping.rules import Mapping, MappingError, load_mappings

ROOT = Path(__file__).resolve().parents[2]
LATIN1 = charset_by_dicom_term("ISO_IR 100")

V231 = {
    "MSH": "MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||ORM^O01|C1|P|2.3.1",
    "PID": "PID|1||ID1^^^HOSP^MR||DOE^JANE^Q^JR^DR||19700101|F",
    "PV1": "PV1|1|O|RAD^R1^B2^HOSP|||||0815^HOUSE^GREGORY^^^DR|||||||||||V1",
    "ORC": "ORC|NW|P1^RIS|F1^RAD||SC||1^^^20261123093000^^S",
    "OBR": "OBR|1|P1^RIS|F1^RAD|^^^CTABD^CT ABDOMEN^LOCAL|||||||||ALLERGY|||9^REQ^ROBERT||ACC1|RP1|SPS1||||CT"
           "||||||||||7^PERF^PAULA",
    "ZDS": "ZDS|1.2.3.4^RIS^Application^DICOM",
}
V251 = {
    "MSH": "MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||OMI^O23^OMI_O23|C2|P|2.5.1||||||UNICODE UTF-8",
    "PID": "PID|1||ID1^^^HOSP^MR||DOE^JANE",
    "ORC": "ORC|NW|P2^RIS|F2^RAD||SC",
    "TQ1": "TQ1|1||||||20261124101500||T",
    "OBR": "OBR|1|P2^RIS|F2^RAD|MRKNEE^MR KNEE^LOCAL",
    "IPC": "IPC|ACC2^HOSP|RP2|1.2.3.5|SPS2|MR|PROT^T1 SAG^LOCAL|STATION1|SUITE B|MR_AE",
}


@pytest.fixture(scope="module")
def mapping() -> Mapping:
    return load_mappings(ROOT / "mappings").default


def build(segments: dict[str, str], **changes: str) -> str:
    merged = {**segments, **changes}
    return "\r".join(s for s in merged.values() if s) + "\r"


def map_message(text: str, mapping: Mapping) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(patient attributes, first item, its step) for a message."""
    message = parse(text)
    charset = charset_for_msh18(message.value(message.msh, 18), LATIN1)
    mapper = Mapper(message, mapping, charset)
    patient = mapper.map_patient()
    orders = mapper.map_orders()
    mapper.raise_problems()
    assert patient is not None
    item = orders[0].procedures[0].steps[0].item
    return patient.attributes, item, step_item(item)


# keyword, level ('patient' | 'item' | 'step'), message template, segment changes, expected value
RULES: list[tuple[str, str, dict[str, str], dict[str, str], str]] = [
    ("PatientID", "patient", V231, {}, "ID1"),
    ("IssuerOfPatientID", "patient", V231, {}, "HOSP"),
    ("PatientName", "patient", V231, {}, "DOE^JANE^Q^DR^JR"),
    ("PatientBirthDate", "patient", V231, {"PID": "PID|1||ID1||DOE||197001011230"}, "19700101"),
    ("PatientSex", "patient", V231, {"PID": "PID|1||ID1||DOE||19700101|A"}, "O"),
    ("CurrentPatientLocation", "item", V231, {}, "RAD R1 B2"),
    ("ReferringPhysicianName", "item", V231, {}, "HOUSE^GREGORY^^DR"),
    ("AdmissionID", "item", V231, {}, "V1"),
    ("AdmissionID", "item", V231, {"PV1": "PV1|1|O", "PID": "PID|1||ID1||DOE|||||||||||||ACCT9"}, "ACCT9"),
    ("PlacerOrderNumberImagingServiceRequest", "item", V231, {}, "P1"),
    ("FillerOrderNumberImagingServiceRequest", "item", V231, {}, "F1"),
    ("AccessionNumber", "item", V231, {}, "ACC1"),
    ("AccessionNumber", "item", V251, {}, "ACC2"),
    ("RequestedProcedureID", "item", V231, {}, "RP1"),
    ("RequestedProcedureID", "item", V251, {}, "RP2"),
    ("RequestedProcedureDescription", "item", V231, {}, "CT ABDOMEN"),
    ("RequestedProcedurePriority", "item", V231, {}, "STAT"),
    ("RequestedProcedurePriority", "item", V251, {}, "MEDIUM"),
    ("RequestingPhysician", "item", V231, {}, "REQ^ROBERT"),
    ("MedicalAlerts", "item", V231, {}, "ALLERGY"),
    ("PatientState", "item", V231, {"OBR": V231["OBR"].replace("|||ALLERGY", "||ISOLATION|ALLERGY")}, "ISOLATION"),
    ("StudyInstanceUID", "item", V231, {}, "1.2.3.4"),
    ("StudyInstanceUID", "item", V251, {}, "1.2.3.5"),
    ("SpecificCharacterSet", "item", V251, {}, "ISO_IR 192"),
    ("Modality", "step", V231, {}, "CT"),
    ("Modality", "step", V251, {}, "MR"),
    ("ScheduledProcedureStepID", "step", V231, {}, "SPS1"),
    ("ScheduledProcedureStepID", "step", V251, {}, "SPS2"),
    ("ScheduledProcedureStepStartDate", "step", V231, {}, "20261123"),
    ("ScheduledProcedureStepStartTime", "step", V231, {}, "093000"),
    ("ScheduledProcedureStepStartDate", "step", V251, {}, "20261124"),
    ("ScheduledProcedureStepStartTime", "step", V251, {}, "101500"),
    ("ScheduledProcedureStepDescription", "step", V231, {}, "CT ABDOMEN"),
    ("ScheduledProcedureStepDescription", "step", V251, {}, "T1 SAG"),
    ("ScheduledPerformingPhysicianName", "step", V231, {}, "PERF^PAULA"),
    ("ScheduledStationName", "step", V251, {}, "STATION1"),
    ("ScheduledProcedureStepLocation", "step", V251, {}, "SUITE B"),
    ("ScheduledStationAETitle", "step", V251, {}, "MR_AE"),
]


@pytest.mark.parametrize(("keyword", "level", "template", "changes", "expected"), RULES,
                         ids=[f"{r[0]}-{r[2]['MSH'][-20:].split('|')[0] or 'v'}-{i}" for i, r in enumerate(RULES)])
def test_rule(mapping: Mapping, keyword: str, level: str, template: dict[str, str], changes: dict[str, str],
              expected: str) -> None:
    patient, item, step = map_message(build(template, **changes), mapping)
    source = {"patient": patient, "item": item, "step": step}[level]
    assert value(source, keyword) == expected


# Rules whose value is a sequence are tested by their own functions below.
SEQUENCE_RULES = {"RequestedProcedureCodeSequence", "ScheduledProtocolCodeSequence", "OtherPatientIDsSequence"}


def test_every_rule_of_the_default_mapping_has_a_test(mapping: Mapping) -> None:
    in_file = {rule.keyword for rules in mapping.rules.values() for rule in rules}
    tested = {r[0] for r in RULES} | SEQUENCE_RULES
    assert in_file - tested == set()


def test_code_sequences(mapping: Mapping) -> None:
    _, item, step = map_message(build(V231), mapping)
    [code] = item[tag_of("RequestedProcedureCodeSequence")]["Value"]
    assert {k: value(code, k) for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")} == {
        "CodeValue": "CTABD", "CodingSchemeDesignator": "LOCAL", "CodeMeaning": "CT ABDOMEN"}
    _, item, step = map_message(build(V251), mapping)
    [code] = step[tag_of("ScheduledProtocolCodeSequence")]["Value"]
    assert value(code, "CodeValue") == "PROT" and value(code, "CodeMeaning") == "T1 SAG"


def test_other_patient_ids(mapping: Mapping) -> None:
    patient, _, _ = map_message(build(V231, PID="PID|1||ID1^^^HOSP^MR~555^^^SSA^SS||DOE"), mapping)
    [other] = patient[tag_of("OtherPatientIDsSequence")]["Value"]
    assert (value(other, "PatientID"), value(other, "IssuerOfPatientID")) == ("555", "SSA")


def test_patient_identifier_type_picks_the_repetition(mapping: Mapping) -> None:
    typed = replace(mapping, patient_identifier_type="MR")
    patient, _, _ = map_message(build(V231, PID="PID|1||555^^^SSA^SS~ID1^^^HOSP^MR||DOE"), typed)
    assert value(patient, "PatientID") == "ID1"
    assert value(patient[tag_of("OtherPatientIDsSequence")]["Value"][0], "PatientID") == "555"


def test_values_are_truncated_to_the_vr_length(mapping: Mapping) -> None:
    long = "A" * 30
    _, item, step = map_message(build(V231, OBR=V231["OBR"].replace("ACC1", long).replace("SPS1", long)),
                                mapping)
    assert value(item, "AccessionNumber") == "A" * 16  # SH
    assert value(step, "ScheduledProcedureStepID") == "A" * 16  # SH


def test_explicit_null_clears_a_patient_attribute(mapping: Mapping) -> None:
    patient, _, _ = map_message(build(V231, PID='PID|1||ID1||DOE||""'), mapping)
    assert patient[tag_of("PatientBirthDate")] == {"vr": "DA"}  # present and empty: clear it
    patient, _, _ = map_message(build(V231, PID="PID|1||ID1||DOE"), mapping)
    assert tag_of("PatientBirthDate") not in patient  # absent: keep what is stored


@pytest.mark.parametrize(("change", "location", "code"), [
    ({"PID": "PID|1||ID1||DOE||1971XXXX"}, "PID-7", "102"),
    ({"ORC": "ORC|NW|P1|||||1^^^2026-11-23T09:30"}, "ORC-7.4", "102"),
    ({"OBR": V231["OBR"].replace("ACC1", "")}, "OBR-18", "101"),
    ({"OBR": V231["OBR"].replace("|CT|", "||")}, "OBR-24", "101"),
    ({"ZDS": "ZDS|1.2.03^RIS"}, "ZDS-1", "102"),
])
def test_problems_name_segment_field_and_code(mapping: Mapping, change: dict[str, str], location: str,
                                              code: str) -> None:
    with pytest.raises(MessageError) as info:
        map_message(build(V231, **change), mapping)
    assert (location, code) in {(p.location, p.code) for p in info.value.problems}


def test_all_problems_are_reported_at_once(mapping: Mapping) -> None:
    text = build(V231, PID="PID|1||ID1||DOE||1971XXXX", OBR=V231["OBR"].replace("ACC1", "").replace("RP1", ""))
    with pytest.raises(MessageError) as info:
        map_message(text, mapping)
    assert {p.location for p in info.value.problems} >= {"PID-7", "OBR-18"}


# --- Study Instance UID policy ----------------------------------------------------------------------
def test_uid_generated_when_absent_and_stable(mapping: Mapping) -> None:
    text = build(V231, ZDS="")
    _, first, _ = map_message(text, mapping)
    _, again, _ = map_message(text, mapping)
    uid = value(first, "StudyInstanceUID")
    assert uid.startswith("2.25.") and uid == value(again, "StudyInstanceUID")
    _, other, _ = map_message(build(V231, ZDS="", OBR=V231["OBR"].replace("ACC1", "ACC9")), mapping)
    assert value(other, "StudyInstanceUID") != uid


def test_uid_root_is_used_for_generated_uids(mapping: Mapping) -> None:
    message = parse(build(V231, ZDS=""))
    mapper = Mapper(message, mapping, LATIN1, uid_root="1.2.826.0.1.3680043.10.999")
    uid = value(mapper.map_orders()[0].procedures[0].steps[0].item, "StudyInstanceUID")
    assert uid.startswith("1.2.826.0.1.3680043.10.999.") and len(uid) <= 64


def test_uid_policy_reject(mapping: Mapping) -> None:
    strict = replace(mapping, study_uid_policy="take-or-reject")
    with pytest.raises(MessageError) as info:
        map_message(build(V231, ZDS=""), strict)
    assert [(p.location, p.code) for p in info.value.problems] == [("ZDS-1", "101")]


def test_uid_policy_generate_ignores_the_message(mapping: Mapping) -> None:
    always = replace(mapping, study_uid_policy="generate")
    _, item, _ = map_message(build(V231), always)
    assert value(item, "StudyInstanceUID").startswith("2.25.")


# --- station AE title rules ---------------------------------------------------------------------------
def test_station_rules_by_sender_modality_and_code() -> None:
    mappings = load_mappings(ROOT / "mappings")
    epic = mappings.for_sender("EPICRIS", "GENHOSP")
    assert epic is not mappings.default
    ct = build(V231)
    _, _, step = map_message(ct, epic)
    assert value(step, "ScheduledStationAETitle") == "CT01"  # by modality
    cardiac = build(V231, OBR=V231["OBR"].replace("CTABD", "CTCARDIAC"))
    _, _, step = map_message(cardiac, epic)
    assert value(step, "ScheduledStationAETitle") == "CT_CARDIO"  # procedure code rule wins (first)
    _, _, step = map_message(ct, mappings.default)
    assert value(step, "ScheduledStationAETitle") == ""  # no rule, no AE: unassigned


def test_station_rule_by_sender(mapping: Mapping) -> None:
    from broker.mapping.rules import StationRule

    ruled = replace(mapping, station_rules=(StationRule((("sending_application", "OTHER"),), "NOT_US"),
                                            StationRule((("sending_application", "RIS"),
                                                         ("sending_facility", "HOSP")), "RIS_AE")))
    _, _, step = map_message(build(V231), ruled)
    assert value(step, "ScheduledStationAETitle") == "RIS_AE"


def test_ipc9_wins_over_rules(mapping: Mapping) -> None:
    from broker.mapping.rules import StationRule

    ruled = replace(mapping, station_rules=(StationRule((("modality", "MR"),), "RULE_AE"),))
    _, _, step = map_message(build(V251), ruled)
    assert value(step, "ScheduledStationAETitle") == "MR_AE"
    _, _, step = map_message(build(V251, IPC=V251["IPC"].replace("|MR_AE", "|")), ruled)
    assert value(step, "ScheduledStationAETitle") == "RULE_AE"


# --- sender overrides and file validation --------------------------------------------------------------
def test_sender_override_merges_over_default(tmp_path: Path) -> None:
    (tmp_path / "senders").mkdir()
    (tmp_path / "default.yaml").write_text((ROOT / "mappings" / "default.yaml").read_text())
    (tmp_path / "senders" / "a.yaml").write_text(
        "match: {sending_application: RIS}\n"
        "attributes:\n  item:\n    MedicalAlerts: null\n    AdmissionID: {source: PID-18}\n")
    (tmp_path / "senders" / "b.yaml").write_text(
        "match: {sending_application: RIS, sending_facility: HOSP}\ndefault_character_set: UNICODE UTF-8\n")
    mappings = load_mappings(tmp_path)
    assert mappings.for_sender("RIS", "HOSP").name == "b"  # the most specific match
    assert mappings.for_sender("RIS", "OTHER").name == "a"
    assert mappings.for_sender("OTHER", "HOSP") is mappings.default
    a = mappings.for_sender("RIS", "OTHER")
    keywords = {r.keyword: r for r in a.rules["item"]}
    assert "MedicalAlerts" not in keywords
    assert [str(p) for p in keywords["AdmissionID"].sources] == ["PID-18"]
    assert len(a.rules["step"]) == len(mappings.default.rules["step"])


@pytest.mark.parametrize(("content", "words"), [
    ("attributes:\n  item:\n    NotAKeyword: {source: PID-5}\n", "not a DICOM keyword"),
    ("attributes:\n  item:\n    PatientName: {source: PID5}\n", "not a field path"),
    ("attributes:\n  item:\n    PatientName: {source: PID-5, transform: shout}\n", "unknown transform"),
    ("study_instance_uid: {policy: maybe}\n", "policy"),
    ("station_ae_title:\n  rules: [{when: {colour: red}, ae_title: X}]\n", "station_ae_title.rules[0]"),
])
def test_invalid_mapping_files_are_refused_with_the_entry_named(tmp_path: Path, content: str,
                                                                words: str) -> None:
    (tmp_path / "default.yaml").write_text(content)
    with pytest.raises(MappingError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_mappings(tmp_path)
