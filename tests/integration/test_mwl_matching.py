"""Modality Worklist matching on SQLite and PostgreSQL: one test (at least) per PS3.4 C.2.2.2 rule.

Items are made the way production makes them: HL7 orders through the intake (``Intake.handle``, the
listener's message handler, without the TCP hop). Most tests query one database per backend loaded
once for the module (a fresh migrated PostgreSQL database costs ~0.2 s, a query a few ms); each group
of tests owns its station AE titles or patient IDs so that groups cannot see each other's items. Tests
that change data after loading use the per-test ``engine`` fixture of tests/conftest.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from io import BytesIO
from typing import Any

import pytest
from conftest import module_database, sample  # tests/ is on sys.path (rootdir conftest, no package)
from mwl_support import UID_PREFIX, Order, place
from pydicom import Dataset, Sequence
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from sqlalchemy import Engine, event, insert, select, text

from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.mwl.finder import PENDING, PENDING_UNSUPPORTED_KEYS, WorklistFinder
from broker.mwl.identifier import parse_identifier
from broker.mwl.matching import WorklistOptions, match_conditions, page_select, worklist_select
from broker.store import migrate
from broker.store.session import make_engine
from broker.store.tables import ScheduledStep, table_of

# pydicom warns when a test builds a query value such as '*ED' for a CS; the values are meant.
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Invalid value for VR")]

STEPS = table_of(ScheduledStep)


ORDERS = [
    # single values on the station, modality and patient ID; case-sensitive non-PN
    Order("SA1", "ST_A", "CT"), Order("SA2", "ST_A", "MR"), Order("SA3", "ST_A2"), Order("SA4", "st_a"),
    Order("PX1", "ST_P", patient_id="PID-X1"), Order("PX2", "ST_P", patient_id="pid-x1"),
    # patient's name, in two character sets
    Order("N1", "ST_N", name="MÜLLER^ERIKA", charset="8859/1"), Order("N2", "ST_N", name="müller^erika"),
    Order("N3", "ST_N", name="MÜLLER^ERIK"), Order("N4", "ST_N", name="MUELLER^ERIKA"),
    # scheduled performing physician; PP3 has none
    Order("PP1", "ST_PP", performing="GREY^MEREDITH"), Order("PP2", "ST_PP", performing="grey^meredith"),
    Order("PP3", "ST_PP"), Order("PP4", "ST_PP", performing="GREYSON^MEREDITH"),
    # SPS start date and time; D6 has no start at all
    Order("D1", "ST_D", start="20261122230000"), Order("D2", "ST_D", start="20261123000000"),
    Order("D3", "ST_D", start="20261123235959"), Order("D4", "ST_D", start="20261124000000"),
    Order("D5", "ST_D", start="20261125120000"), Order("D6", "ST_D", start=""),
    # a start date without a time
    Order("E1", "ST_E", start="20261123"), Order("E2", "ST_E", start="20261123080000"),
    # birth dates, one unknown
    Order("B1", "ST_B", birth_date="19500101"), Order("B2", "ST_B", birth_date=""),
    Order("B3", "ST_B", birth_date="19900101"),
    # wildcard characters of SQL in stored values
    Order("W1", "ST_W", accession="AC%1"), Order("W2", "ST_W", accession="AC_1"),
    Order("W3", "ST_W", accession="ACX1"), Order("W4", "ST_W", accession="ACXY1"),
    Order("W5", "ST_W", accession="AC[1"), Order("W6", "ST_W", accession="ac%1"),
    # Study Instance UIDs
    Order("U1", "ST_U", study_uid=UID_PREFIX + "9001"), Order("U2", "ST_U", study_uid=UID_PREFIX + "9002"),
    Order("U3", "ST_U", study_uid=UID_PREFIX + "9003"),
    # statuses
    Order("H1", "ST_H"), Order("H2", "ST_H", then=("CA^CA",)), Order("H3", "ST_H", then=("SC^IP",)),
    Order("H4", "ST_H", then=("SC^CM",)), Order("H5", "ST_H", then=("DC^CA",)),
    # paging: more matches than a page, equal starts, one without a start
    *(Order(f"PG{n}", "ST_PG", start=f"2026112{3 + n % 2}{8 + n // 3:02d}0000") for n in range(7)),
    Order("PG7", "ST_PG", start=""),
]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def worklist(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             mappings: MappingSet) -> Iterator[Engine]:
    """A migrated database of each backend holding :data:`ORDERS` and the two-step OMI sample."""
    urls = module_database(request.param, tmp_path_factory, "mwl")
    url = next(urls)
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        intake = Intake(engine, mappings)
        place(intake, *ORDERS)
        assert b"MSA|AA|" in intake.handle(sample("omi_o23_two_steps.hl7").replace(b"|AL|NE|", b"|||"))[0]
        yield engine
    finally:
        engine.dispose()
        for _ in urls:  # drops the PostgreSQL database
            pass


@pytest.fixture
def finder(worklist: Engine) -> WorklistFinder:
    return WorklistFinder(worklist)


# --- queries ---------------------------------------------------------------------------------------
def identifier(sps: dict[str, Any] | None = None, **top: Any) -> Dataset:
    """An identifier with the given top-level keys and SPS item keys; SPS ID is always asked for."""
    dataset = Dataset()
    for keyword, value in top.items():
        setattr(dataset, keyword, value)
    item = Dataset()
    item.ScheduledProcedureStepID = ""
    for keyword, value in (sps or {}).items():
        setattr(item, keyword, value)
    dataset.ScheduledProcedureStepSequence = [item]
    return dataset


def responses(finder: WorklistFinder, query: Dataset) -> list[Dataset]:
    return list(finder.find(query, "TESTSCU").responses)


def sps_ids(finder: WorklistFinder, sps: dict[str, Any] | None = None, **top: Any) -> list[str]:
    """SPS IDs of the responses, in answer order."""
    return [str(r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID)
            for r in responses(finder, identifier(sps, **top))]


def matched(finder: WorklistFinder, sps: dict[str, Any] | None = None, **top: Any) -> set[str]:
    ids = sps_ids(finder, sps, **top)
    assert len(ids) == len(set(ids)), f"an item answered twice: {ids}"
    return set(ids)


def encoded(dataset: Dataset) -> bytes:
    """The dataset as an implicit VR little endian identifier would travel, in its character set."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, dataset)
    return out.getvalue()


def decoded(raw: bytes) -> Dataset:
    """What pynetdicom hands to a handler: a dataset read from the bytes, decoded on access."""
    return read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)


# --- single value matching -------------------------------------------------------------------------
def test_single_value_station_ae_title(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "ST_A"}) == {"SA1", "SA2"}


def test_single_value_modality(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "ST_A", "Modality": "MR"}) == {"SA2"}


def test_single_value_patient_id(finder: WorklistFinder) -> None:
    assert matched(finder, PatientID="PID-X1") == {"PX1"}


def test_single_value_patient_name(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "ST_N"}, PatientName="MUELLER^ERIKA") == {"N4"}


def test_single_value_performing_physician(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledPerformingPhysicianName": "GREYSON^MEREDITH"}) == {"PP4"}


def test_single_value_sps_start_date_is_the_whole_day(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "ST_D", "ScheduledProcedureStepStartDate": "20261123"}) \
        == {"D2", "D3"}


def test_single_value_on_non_pn_is_case_sensitive(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "st_a"}) == {"SA4"}
    assert matched(finder, PatientID="pid-x1") == {"PX2"}
    assert matched(finder, {"ScheduledStationAETitle": "ST_A", "Modality": "mr"}) == set()
    assert matched(finder, {"ScheduledStationAETitle": "ST_W"}, AccessionNumber="AC%1") == {"W1"}


# --- person names ----------------------------------------------------------------------------------
def test_pn_case_insensitive_by_default(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "ST_N"}, PatientName="müller^ERIKA") == {"N1", "N2"}
    assert matched(finder, {"ScheduledPerformingPhysicianName": "Grey^Meredith"}) == {"PP1", "PP2"}
    assert matched(finder, {"ScheduledStationAETitle": "ST_N"}, PatientName="MÜLLER^ERIK*") == {"N1", "N2", "N3"}


def test_pn_case_sensitive_when_the_option_is_off(worklist: Engine) -> None:
    exact = WorklistFinder(worklist, WorklistOptions(pn_case_insensitive=False))
    assert matched(exact, {"ScheduledStationAETitle": "ST_N"}, PatientName="MÜLLER^ERIKA") == {"N1"}
    assert matched(exact, {"ScheduledStationAETitle": "ST_N"}, PatientName="müller^erika") == {"N2"}
    assert matched(exact, {"ScheduledStationAETitle": "ST_N"}, PatientName="müller^ERIKA") == set()
    assert matched(exact, {"ScheduledStationAETitle": "ST_N"}, PatientName="MÜLLER^ERIK*") == {"N1", "N3"}
    assert matched(exact, {"ScheduledStationAETitle": "ST_N"}, PatientName="*ller^erika") == {"N2"}
    assert matched(exact, {"ScheduledPerformingPhysicianName": "grey^meredith"}) == {"PP2"}


def test_pn_trailing_empty_components_are_insignificant(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "ST_N"}, PatientName="MUELLER^ERIKA^^") == {"N4"}


# --- wildcards -------------------------------------------------------------------------------------
def test_wildcard_star(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "ST_W"}, AccessionNumber="AC*1") \
        == {"W1", "W2", "W3", "W4", "W5"}
    assert matched(finder, {"ScheduledStationAETitle": "ST_*", "Modality": "MR"}) == {"SA2"}


def test_wildcard_question_mark_is_exactly_one_character(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "ST_W"}, AccessionNumber="AC?1") \
        == {"W1", "W2", "W3", "W5"}
    assert matched(finder, {"ScheduledStationAETitle": "ST_N"}, PatientName="M?LLER^ERIKA") == {"N1", "N2"}


def test_sql_wildcard_characters_in_a_value_are_literal(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "ST_W"}, AccessionNumber="AC%*") == {"W1"}
    assert matched(finder, {"ScheduledStationAETitle": "ST_W"}, AccessionNumber="AC_*") == {"W2"}
    assert matched(finder, {"ScheduledStationAETitle": "ST_W"}, AccessionNumber="AC[*") == {"W5"}
    assert matched(finder, {"ScheduledStationAETitle": "ST_W"}, AccessionNumber="AC%") == set()


def test_wildcard_is_case_sensitive_on_non_pn(finder: WorklistFinder) -> None:
    # SQLite's LIKE would match 'AC%1' here too: GLOB keeps case.
    assert matched(finder, {"ScheduledStationAETitle": "ST_W"}, AccessionNumber="ac*") == {"W6"}
    assert matched(finder, {"ScheduledStationAETitle": "st_*"}) == {"SA4"}


# --- dates and times -------------------------------------------------------------------------------
def _dates(finder: WorklistFinder, date: str = "", time: str = "", station: str = "ST_D") -> set[str]:
    sps = {"ScheduledStationAETitle": station, "ScheduledProcedureStepStartDate": date,
           "ScheduledProcedureStepStartTime": time}
    return matched(finder, sps)


def test_closed_date_range(finder: WorklistFinder) -> None:
    assert _dates(finder, "20261123-20261124") == {"D2", "D3", "D4"}


def test_open_date_ranges(finder: WorklistFinder) -> None:
    assert _dates(finder, "-20261122") == {"D1"}
    assert _dates(finder, "20261124-") == {"D4", "D5"}


def test_time_range_alone_is_a_time_of_day(finder: WorklistFinder) -> None:
    assert _dates(finder, time="2300-2359") == {"D1", "D3"}
    assert _dates(finder, time="1200") == {"D5"}  # the minute 12:00
    assert _dates(finder, time="-0000") == {"D2", "D4"}


def test_time_range_alone_across_midnight(finder: WorklistFinder) -> None:
    assert _dates(finder, time="2300-0100") == {"D1", "D2", "D3", "D4"}


def test_combined_date_time_range_crosses_midnight(finder: WorklistFinder) -> None:
    # One range from 2026-11-22 22:00 to 2026-11-23 01:00, not 22:00-01:00 on each day.
    assert _dates(finder, "20261122-20261123", "2200-0100") == {"D1", "D2"}
    # From the 22nd 23:30: D1 (23:00 on the 22nd) is before it, D3 (23:59:59 on the 23rd) after 01:00.
    assert _dates(finder, "20261122-20261123", "2330-0100") == {"D2"}
    assert _dates(finder, "20261123-20261124", "0800-1700") == {"D3", "D4"}


def test_combined_date_and_single_time(finder: WorklistFinder) -> None:
    assert _dates(finder, "20261123", "235959") == {"D3"}
    assert _dates(finder, "20261123", "2359") == {"D3"}
    assert _dates(finder, "20261123", "2358") == set()


def test_universal_date_returns_items_without_a_start(finder: WorklistFinder) -> None:
    assert _dates(finder) == {"D1", "D2", "D3", "D4", "D5", "D6"}


def test_stored_empty_value_does_not_match(finder: WorklistFinder) -> None:
    # E1 has a date and no time: a time range must not read its empty time as 00:00.
    assert _dates(finder, time="-1200", station="ST_E") == {"E2"}
    # B2 has no birth date: '' sorts before every date, and must still not match.
    assert matched(finder, {"ScheduledStationAETitle": "ST_B"}, PatientBirthDate="-19600101") == {"B1"}
    assert matched(finder, {"ScheduledStationAETitle": "ST_B"}, PatientBirthDate="19800101-") == {"B3"}
    # PP3 has no performing physician: a wildcard that is not universal skips it.
    assert matched(finder, {"ScheduledStationAETitle": "ST_PP", "ScheduledPerformingPhysicianName": "?*"}) \
        == {"PP1", "PP2", "PP4"}


def test_birth_date_single_value(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "ST_B"}, PatientBirthDate="19500101") == {"B1"}


# --- UID lists and universal matching --------------------------------------------------------------
def test_uid_list(finder: WorklistFinder) -> None:
    assert matched(finder, StudyInstanceUID=[UID_PREFIX + "9001", UID_PREFIX + "9003"]) == {"U1", "U3"}
    assert matched(finder, StudyInstanceUID=UID_PREFIX + "9002") == {"U2"}


def test_universal_matching_returns_every_item_and_the_attribute(finder: WorklistFinder) -> None:
    query = identifier({"ScheduledStationAETitle": "ST_PP", "ScheduledPerformingPhysicianName": "",
                        "Modality": ""}, PatientName="", PatientID="")
    found = {str(r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID): r for r in responses(finder, query)}
    assert set(found) == {"PP1", "PP2", "PP3", "PP4"}
    assert str(found["PP1"].ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName) == "GREY^MEREDITH"
    assert found["PP3"].ScheduledProcedureStepSequence[0]["ScheduledPerformingPhysicianName"].is_empty
    assert found["PP1"].PatientID == "PPP1" and found["PP1"].ScheduledProcedureStepSequence[0].Modality == "CT"
    # '*' alone is universal as well, also where it is a date
    assert matched(finder, {"ScheduledStationAETitle": "ST_PP", "ScheduledPerformingPhysicianName": "*"}) \
        == {"PP1", "PP2", "PP3", "PP4"}
    assert _dates(finder, "*") == {"D1", "D2", "D3", "D4", "D5", "D6"}


# --- sequences -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sequence", [Sequence(), Sequence([Dataset()])], ids=["zero-length", "empty-item"])
def test_empty_sps_sequence_returns_the_whole_sequence(finder: WorklistFinder, sequence: Sequence) -> None:
    query = Dataset()
    query.PatientID = "PID-X1"
    query.ScheduledProcedureStepSequence = sequence
    [response] = responses(finder, query)
    [step] = response.ScheduledProcedureStepSequence
    assert (step.ScheduledStationAETitle, step.Modality, step.ScheduledProcedureStepID) == ("ST_P", "CT", "PX1")
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == ("20261123", "093000")
    assert step.ScheduledProcedureStepStatus == "SCHEDULED"
    assert step.ScheduledProtocolCodeSequence[0].CodeValue == "PROTO"


def test_sps_keys_must_all_match_the_one_step(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "ST_A", "Modality": "CT"}) == {"SA1"}
    assert matched(finder, {"ScheduledStationAETitle": "ST_A2", "Modality": "MR"}) == set()


def test_one_response_per_step(finder: WorklistFinder) -> None:
    found = responses(finder, identifier({"ScheduledStationAETitle": "MR2"}, AccessionNumber=""))
    assert sorted(str(r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID) for r in found) \
        == ["SPS501A", "SPS501B"]
    assert [len(r.ScheduledProcedureStepSequence) for r in found] == [1, 1]
    assert {r.AccessionNumber for r in found} == {"ACC501"}


# --- unsupported keys ------------------------------------------------------------------------------
def test_unsupported_optional_key_is_flagged_ignored_and_returned(finder: WorklistFinder) -> None:
    query = identifier({"ScheduledStationAETitle": "ST_A"}, RequestedProcedurePriority="STAT")
    result = finder.find(query, "TESTSCU")
    assert result.pending_status == PENDING_UNSUPPORTED_KEYS
    assert result.unsupported_keys == ("RequestedProcedurePriority",)
    found = list(result.responses)
    assert {str(r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID) for r in found} == {"SA1", "SA2"}
    assert {r.RequestedProcedurePriority for r in found} == {"ROUTINE"}  # the stored value, not the key's


def test_value_inside_another_sequence_is_unsupported(finder: WorklistFinder) -> None:
    code = Dataset()
    code.CodeValue = "NOSUCH"
    result = finder.find(identifier({"ScheduledStationAETitle": "ST_A", "ScheduledProtocolCodeSequence": [code]}),
                         "TESTSCU")
    assert result.unsupported_keys == ("ScheduledProcedureStepSequence>ScheduledProtocolCodeSequence>CodeValue",)
    assert len(list(result.responses)) == 2


def test_supported_keys_only_is_plain_pending(finder: WorklistFinder) -> None:
    result = finder.find(identifier({"ScheduledStationAETitle": "ST_A"}, PatientName="*", AccessionNumber=""),
                         "TESTSCU")
    assert (result.pending_status, result.unsupported_keys) == (PENDING, ())


# --- statuses and visibility -----------------------------------------------------------------------
def test_hidden_statuses_by_default(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "ST_H"}) == {"H1"}
    assert matched(finder, {"ScheduledStationAETitle": "ST_H", "ScheduledProcedureStepStatus": ""}) == {"H1"}


def test_hidden_statuses_configured(worklist: Engine) -> None:
    everything = WorklistFinder(worklist, WorklistOptions(hidden_statuses=frozenset()))
    assert matched(everything, {"ScheduledStationAETitle": "ST_H"}) == {"H1", "H2", "H3", "H4", "H5"}
    only_cancelled = WorklistFinder(worklist, WorklistOptions(hidden_statuses=frozenset({"CANCELED"})))
    assert matched(only_cancelled, {"ScheduledStationAETitle": "ST_H"}) == {"H1", "H3", "H4", "H5"}


def test_an_explicit_status_key_wins_over_hiding(finder: WorklistFinder) -> None:
    assert matched(finder, {"ScheduledStationAETitle": "ST_H", "ScheduledProcedureStepStatus": "CANCELED"}) == {"H2"}
    assert matched(finder, {"ScheduledStationAETitle": "ST_H", "ScheduledProcedureStepStatus": "*ED"}) \
        == {"H1", "H2", "H3", "H4", "H5"}


def test_station_sees_only_its_own_items(finder: WorklistFinder) -> None:
    own = finder.for_station("ST_A ")
    assert matched(own) == {"SA1", "SA2"}
    assert matched(own, {"ScheduledStationAETitle": "ST_P"}) == set()
    assert matched(own, PatientID="PID-X1") == set()
    assert matched(finder, PatientID="PID-X1") == {"PX1"}


# --- responses -------------------------------------------------------------------------------------
def test_only_requested_attributes_and_type_2_empty(finder: WorklistFinder) -> None:
    code = Dataset()
    code.CodeValue = ""
    query = identifier({"Modality": "", "ScheduledProtocolCodeSequence": [code]},
                       PatientID="PID-X1", PatientName="", ReferringPhysicianName="", PatientWeight="")
    [response] = responses(finder, query)
    assert [e.keyword for e in response] == ["SpecificCharacterSet", "ReferringPhysicianName", "PatientName",
                                             "PatientID", "PatientWeight", "ScheduledProcedureStepSequence"]
    assert response["ReferringPhysicianName"].is_empty and response["PatientWeight"].is_empty
    [step] = response.ScheduledProcedureStepSequence
    assert [e.keyword for e in step] == ["Modality", "ScheduledProtocolCodeSequence", "ScheduledProcedureStepID"]
    assert [[e.keyword for e in code] for code in step.ScheduledProtocolCodeSequence] == [["CodeValue"]]
    assert step.ScheduledProtocolCodeSequence[0].CodeValue == "PROTO"


def test_requested_sequence_the_item_lacks_is_empty(finder: WorklistFinder) -> None:
    [response] = responses(finder, identifier(PatientID="PID-X1", ReferencedStudySequence=Sequence()))
    assert "ReferencedStudySequence" in response and len(response.ReferencedStudySequence) == 0


def test_latin_1_item_answers_in_iso_ir_100(finder: WorklistFinder) -> None:
    [response] = responses(finder, identifier(PatientID="PN1", PatientName=""))
    assert response.SpecificCharacterSet == "ISO_IR 100"
    assert str(response.PatientName) == "MÜLLER^ERIKA"
    raw = encoded(response)
    assert b"M\xdcLLER^ERIKA" in raw
    assert str(decoded(raw).PatientName) == "MÜLLER^ERIKA"


def test_utf_8_item_answers_in_iso_ir_192(finder: WorklistFinder) -> None:
    [response] = responses(finder, identifier(PatientID="PN2", PatientName=""))
    assert response.SpecificCharacterSet == "ISO_IR 192"
    assert "müller^erika".encode() in encoded(response)
    [first, _] = responses(finder, identifier({"ScheduledStationAETitle": "MR2"}, PatientName=""))
    assert (first.SpecificCharacterSet, str(first.PatientName)) == ("ISO_IR 192", "NGUYỄN^LINH^^MS")


def test_query_in_iso_ir_100_with_a_latin_1_name(finder: WorklistFinder) -> None:
    query = identifier({"ScheduledStationAETitle": "ST_N"}, SpecificCharacterSet="ISO_IR 100",
                       PatientName="MÜLLER^ERIKA")
    raw = encoded(query)
    assert b"M\xdcLLER^ERIKA" in raw
    found = responses(finder, decoded(raw))
    assert {str(r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID) for r in found} == {"N1", "N2"}


# --- paging ----------------------------------------------------------------------------------------
@contextmanager
def selects_on_steps(engine: Engine) -> Iterator[list[str]]:
    """The SELECT statements on scheduled_steps executed meanwhile."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "scheduled_steps" in statement:
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_paging_returns_every_match_exactly_once_in_order(worklist: Engine) -> None:
    paged = WorklistFinder(worklist, WorklistOptions(page_size=3))
    with selects_on_steps(worklist) as statements:
        result = paged.find(identifier({"ScheduledStationAETitle": "ST_PG"}), "TESTSCU")
        assert statements == []  # nothing is read before the first response is asked for
        first = next(result.responses)
        assert len(statements) == 1  # one page, not the whole match
        ids = [str(r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID)
               for r in itertools.chain([first], result.responses)]
    assert sorted(ids) == sorted(f"PG{n}" for n in range(8))
    # dated items in start order (equal starts by id), then the one without a start
    with worklist.connect() as connection:
        dated = connection.execute(
            select(STEPS.c.sps_id).where(STEPS.c.scheduled_station_ae_title == "ST_PG",
                                         STEPS.c.scheduled_start.is_not(None))
            .order_by(STEPS.c.scheduled_start, STEPS.c.id)).scalars().all()
    assert ids == [*dated, "PG7"]
    # the unpaged statement (for inspection) has the same rows in the same order
    where_query = parse_identifier(identifier({"ScheduledStationAETitle": "ST_PG"}))
    with worklist.connect() as connection:
        unpaged = connection.execute(worklist_select(where_query, WorklistOptions(), worklist.dialect.name)).all()
    assert [row.item["00400100"]["Value"][0]["00400009"]["Value"][0] for row in unpaged] == ids
    # 7 dated rows in pages of 3 (reads of 3, 3, 1) and one read for the undated phase
    assert len(statements) == 4
    assert all("LIMIT" in s.upper() for s in statements)


def test_a_broad_query_larger_than_a_page(worklist: Engine) -> None:
    small = WorklistFinder(worklist, WorklistOptions(page_size=2, hidden_statuses=frozenset()))
    ids = sps_ids(small)
    with worklist.connect() as connection:
        stored = connection.execute(select(STEPS.c.sps_id)).scalars().all()
    assert sorted(ids) == sorted(stored) and len(ids) == len(ORDERS) + 2


# --- tests on a database of their own ---------------------------------------------------------------
def test_item_whose_name_changed_to_japanese_answers_in_utf_8(engine: Engine, mappings: MappingSet) -> None:
    intake = Intake(engine, mappings)
    place(intake, Order("J1", "ST_J", name="MÜLLER^ERIKA", patient_id="PJ1", charset="8859/1"))
    a08 = ("MSH|^~\\&|CERNER|CITYMED|WLBROKER|RADIOLOGY|20261123100000||ADT^A08|JA08|P|2.5.1||||||UNICODE UTF-8\r"
           "EVN|A08\rPID|1||PJ1^^^CITYMED^MR||山田^太郎||19700101|F\r")
    assert b"MSA|AA|" in intake.handle(a08.encode())[0]
    with engine.connect() as connection:
        stored_set = connection.execute(select(STEPS.c.specific_character_set)).scalar_one()
    assert stored_set == "ISO_IR 100"  # the item keeps the set it was mapped in
    [response] = responses(WorklistFinder(engine), identifier(PatientID="PJ1", PatientName=""))
    assert response.SpecificCharacterSet == "ISO_IR 192"
    assert str(response.PatientName) == "山田^太郎"
    assert str(decoded(encoded(response)).PatientName) == "山田^太郎"


def test_uids_come_back_unchanged_across_queries(engine: Engine, mappings: MappingSet) -> None:
    place(Intake(engine, mappings), Order("G1", "ST_G", study_uid=None), Order("G2", "ST_G"))
    finder = WorklistFinder(engine)
    query = identifier({"ScheduledStationAETitle": "ST_G"}, StudyInstanceUID="")
    first = {str(r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID): r.StudyInstanceUID
             for r in responses(finder, query)}
    second = {str(r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID): r.StudyInstanceUID
              for r in responses(finder, query)}
    with engine.connect() as connection:
        stored = {row.sps_id: row.study_instance_uid
                  for row in connection.execute(select(STEPS.c.sps_id, STEPS.c.study_instance_uid))}
    assert first == second == stored
    assert first["G1"].startswith("2.25.")  # generated by the broker (none in the order)


# --- query plans -----------------------------------------------------------------------------------
def _fill(engine: Engine, mappings: MappingSet, days: int = 120, per_day: int = 100) -> None:
    """One order through HL7, then copies of its step: ``per_day`` a day over 8 stations and 3 modalities
    for ``days`` days from 2026-09-01, in schedule order, the first half completed. The planner needs
    a realistic table (a week is a small part of it, yet more than a page); sending thousands of HL7
    messages would only cost time."""
    place(Intake(engine, mappings), Order("SEED", "CT01"))
    with engine.begin() as connection:
        seed = {k: v for k, v in connection.execute(select(STEPS)).mappings().one().items() if k != "id"}
        base = datetime(2026, 9, 1, 7, 0)
        rows = []
        for n in range(days * per_day):
            start = base + timedelta(days=n // per_day, minutes=5 * (n % per_day))
            rows.append({**seed, "sps_id": f"S{n}", "study_instance_uid": f"1.2.3.{n}",
                         "scheduled_station_ae_title": f"ST{n % 8}", "modality": ("CT", "MR", "US")[n % 3],
                         "sps_status": "COMPLETED" if n < days * per_day // 2 else "SCHEDULED",
                         "scheduled_start": start, "sps_start_date": start.strftime("%Y%m%d"),
                         "sps_start_time": start.strftime("%H%M%S")})
        connection.execute(insert(STEPS), rows)
        connection.execute(text("ANALYZE"))


def _plan(engine: Engine, sps: dict[str, Any]) -> str:
    query = parse_identifier(identifier(sps))
    where = match_conditions(query, WorklistOptions(), engine.dialect.name)
    statement = page_select(where, None, 500)
    sql = str(statement.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            return "\n".join(str(row[-1]) for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
        return "\n".join(str(row[0]) for row in connection.exec_driver_sql("EXPLAIN " + sql.replace("%%", "%")))


def test_station_and_week_queries_use_an_index(engine: Engine, mappings: MappingSet) -> None:
    _fill(engine, mappings)
    # the modality's station asks for today's CT steps
    plan = _plan(engine, {"ScheduledStationAETitle": "ST3", "ScheduledProcedureStepStartDate": "20261210",
                          "Modality": "CT"})
    assert "ix_steps_station_start" in plan or "ix_steps_modality_start" in plan, plan
    assert "Seq Scan" not in plan and "SCAN scheduled_steps" not in plan, plan
    # a broad query: one week, any station (more matches than a page: the ordered index stops early)
    plan = _plan(engine, {"ScheduledProcedureStepStartDate": "20261207-20261213"})
    assert "ix_steps_start" in plan, plan
    assert "Seq Scan" not in plan and "SCAN scheduled_steps" not in plan, plan
    assert "Sort" not in plan and "TEMP B-TREE" not in plan, plan  # read in answer order, no sort
