"""The UPS SQL pre-filter's conditions (broker.ups.prefilter): which keys narrow, how, and that the
SPS Start DateTime bounds hold every start the UPS match accepts (the pre-filter may be loose, never tight).
"""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from sqlalchemy.dialects import postgresql, sqlite

from broker.dicom_json import JsonDataset, element, tag_of
from broker.domain import ups_matching
from broker.domain.worklist_item import scheduled_start
from broker.ups import prefilter


def _json(**keys: object) -> JsonDataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds.to_json_dict()


def _sql(pre: prefilter.Prefilter, dialect: str = "sqlite") -> str:
    statement = prefilter.candidate_ids(pre, dialect)
    engine_dialect = postgresql.dialect() if dialect == "postgresql" else sqlite.dialect()
    return str(statement.compile(dialect=engine_dialect, compile_kwargs={"literal_binds": True}))


# --- SPS Start DateTime bounds -------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "low", "high"), [
    ("20261205000000-20261205235959", datetime(2026, 12, 5), datetime(2026, 12, 6)),
    ("20261205-20261205", datetime(2026, 12, 5), datetime(2026, 12, 6)),
    ("20261205", datetime(2026, 12, 5), datetime(2026, 12, 6)),
    ("20261205000000", datetime(2026, 12, 5), datetime(2026, 12, 5, 0, 0, 1)),
    ("-20261205", None, datetime(2026, 12, 6)),
    ("20261205120000-", datetime(2026, 12, 5, 12), None),
    ("2026120509-2026120509", datetime(2026, 12, 5, 9), datetime(2026, 12, 5, 10)),
    ("202612050930-202612050930", datetime(2026, 12, 5, 9, 30), datetime(2026, 12, 5, 9, 31)),
    # fractions and UTC offsets are past the seconds: the bounds keep the second they are in
    ("20261205093000.5-20261205093000.999999", datetime(2026, 12, 5, 9, 30), datetime(2026, 12, 5, 9, 30, 1)),
    ("20261205093000+0100", datetime(2026, 12, 5, 9, 30), datetime(2026, 12, 5, 9, 30, 1)),
    ("202612-202612", datetime(2026, 12, 1), datetime(2027, 1, 1)),
    ("2026-2026", datetime(2026, 1, 1), datetime(2027, 1, 1)),
    # not a valid second / hour / day: the longest valid prefix decides (looser, still a superset)
    ("20261205240000-20261205246000", datetime(2026, 12, 5), datetime(2026, 12, 6)),
    ("20261232-", datetime(2026, 12, 1), None),
    ("2026120-", datetime(2026, 12, 1), None),
    ("abc-", None, None),
])
def test_start_bounds(text: str, low: datetime | None, high: datetime | None) -> None:
    assert prefilter.start_bounds(text) == (low, high)


_DATES = st.sampled_from(["20261204", "20261205", "20261206", "20261231", "20270101", "20240229"])
# ASCII digits, as the mappings write them (a TM of other Unicode digits is read by strptime: not covered)
_TIMES = st.one_of(st.just(""), st.from_regex(r"\A([01][0-9]|2[0-3])([0-5][0-9]([0-5][0-9](\.[0-9]{1,6})?)?)?\Z"))
_BOUND = st.one_of(
    st.just(""),
    st.builds(lambda d, t, cut: (d + t)[:cut], _DATES, _TIMES, st.integers(4, 21)),
    st.builds(lambda d, t: d + t + "+0100", _DATES, st.just("093000")),
)


@settings(max_examples=600, deadline=None)
@given(date=_DATES, time=_TIMES, low=_BOUND, high=_BOUND, single=st.booleans())
def test_every_start_the_ups_match_accepts_is_within_the_bounds(date: str, time: str, low: str, high: str,
                                                               single: bool) -> None:
    """The UPS match compares the DT strings; the bounds are on the stored scheduled_start datetime."""
    text = low if single else f"{low}-{high}"
    if not text:
        return
    stored = date + time
    key = {"vr": "DT", "Value": [text]}
    if not ups_matching.element_matches(key, {"vr": "DT", "Value": [stored]}):
        return
    start = scheduled_start(date, time)
    assert start is not None
    lower, upper = prefilter.start_bounds(text)
    assert lower is None or start >= lower
    assert upper is None or start < upper


# --- which keys narrow, and how ---------------------------------------------------------------------------
def test_no_key_no_filter() -> None:
    assert not prefilter.build(_json(SOPInstanceUID="", WorklistLabel="", PatientName="")).narrows


def test_worklist_label_is_the_station_else_the_modality_or_an_override() -> None:
    pre = prefilter.build(_json(WorklistLabel="CT01"))
    [label] = pre.overridable
    assert label.json_tag == tag_of("WorklistLabel") and label.split
    sql = _sql(pre)
    assert "scheduled_steps.scheduled_station_ae_title = 'CT01'" in sql
    assert "scheduled_steps.scheduled_station_ae_title = '' AND scheduled_steps.modality = 'CT01'" in sql
    assert "json_type(ups_workitems.attributes, '$.\"00741202\"') IS NOT NULL" in sql
    assert "(ups_workitems.attributes -> '00741202') IS NOT NULL" in _sql(pre, "postgresql")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DT:UserWarning")
def test_a_wildcard_stays_in_python() -> None:
    assert not prefilter.build(_json(WorklistLabel="CT*")).narrows
    assert not prefilter.build(_json(ScheduledProcedureStepStartDateTime="2026*")).narrows
    assert not prefilter.build(_json(PatientName="DOE*")).narrows


def test_station_and_today_is_one_select_per_index_and_one_for_workitems() -> None:
    pre = prefilter.build(_json(WorklistLabel="CT01",
                                ScheduledProcedureStepStartDateTime="20261205000000-20261205235959"))
    sql = _sql(pre)
    # 2 Worklist Label alternatives x 2 start alternatives (in range; date there but unreadable) + workitems
    assert sql.count("SELECT scheduled_steps.id") == 5
    assert "scheduled_steps.scheduled_start >= '2026-12-05 00:00:00.000000'" in sql
    assert "scheduled_steps.scheduled_start < '2026-12-06 00:00:00.000000'" in sql
    assert "scheduled_steps.scheduled_start IS NULL AND scheduled_steps.sps_start_date != ''" in sql
    # the workitems branch: only those holding Worklist Label or the start at all
    assert "json_type(ups_workitems.attributes, '$.\"00741202\"') IS NOT NULL OR " \
           "json_type(ups_workitems.attributes, '$.\"00404005\"') IS NOT NULL" in sql


def test_patient_keys_always_come_from_the_item() -> None:
    """Patient's Name / ID / Issuer, the state and the SOP Instance UID: no workitem overrides them."""
    pre = prefilter.build(_json(PatientName="doe^jane^", PatientID="P1", IssuerOfPatientID="CITY",
                                ProcedureStepState="SCHEDULED", SOPInstanceUID="1.2.3"))
    assert not pre.overridable and len(pre.fixed) == 5
    sql = _sql(pre)
    assert "scheduled_steps.patient_name_norm IN ('DOE^JANE', 'DOE^JANE^', 'DOE^JANE^^', 'DOE^JANE^^^', " \
           "'DOE^JANE^^^^')" in sql
    assert "scheduled_steps.sps_status IN ('SCHEDULED', 'ARRIVED', 'READY')" in sql
    assert "ups_workitems" not in sql  # steps with a workitem pass on these columns like any other


def test_study_and_request_keys_may_be_overridden() -> None:
    request = Dataset()
    request.AccessionNumber = "A1"
    pre = prefilter.build(_json(StudyInstanceUID="1.2.3", ReferencedRequestSequence=[request]))
    assert [o.json_tag for o in pre.overridable] == [tag_of("StudyInstanceUID"), tag_of("ReferencedRequestSequence")]
    assert not pre.fixed


def test_station_name_code_value() -> None:
    code = Dataset()
    code.CodeValue = "SCANNER1"
    [station] = prefilter.build(_json(ScheduledStationNameCodeSequence=[code])).overridable
    assert station.json_tag == tag_of("ScheduledStationNameCodeSequence")
    code.CodeValue = "S" * 16  # a longer stored name is cut to 16 in the view: not an equality
    assert not prefilter.build(_json(ScheduledStationNameCodeSequence=[code])).narrows


def test_start_needs_a_dt_key() -> None:
    query = {tag_of("ScheduledProcedureStepStartDateTime"): element("PatientName", "20261205")}
    assert not prefilter.build(query).narrows
