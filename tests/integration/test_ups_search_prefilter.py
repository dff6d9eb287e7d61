"""UPS C-FIND / UPS-RS Search with the SQL pre-filter answers exactly what matching every step's UPS view
would (SQLite and PostgreSQL).

A few hundred steps with varied starts (midnight, the last second of a day, minutes, fractions, only a
date, none, an unreadable date), stations and modalities (Worklist Label is the station, else the
modality), patient names in both cases and with trailing carets; some made by UPS N-CREATE, some HL7-like
steps whose Worklist Label, start or station a UPS N-SET overrode, some claimed. For each query of a
table the answer of :meth:`UpsService.find` equals a brute-force match of every step's view, computed
here without the pre-filter.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime
from functools import partial
from typing import Any

import orjson
import pytest
from conftest import module_database  # tests/ is on sys.path (rootdir conftest, no package)
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Connection, Engine, select

from broker.dicom_json import JsonDataset, element, tag_of
from broker.domain import ups_matching, ups_view
from broker.domain.records import Cause, OrderRecord, PatientKey, PatientRecord, ProcedureRecord, StepRecord
from broker.domain.services import WorklistService
from broker.store import migrate
from broker.store.session import make_engine
from broker.store.tables import ScheduledStep, UpsWorkitem, table_of
from broker.ups import prefilter
from broker.ups.service import UpsService
from broker.workflow.outcome import Outcome

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300),
              # the unreadable start date on purpose: pydicom warns when the answer carries it
              pytest.mark.filterwarnings("ignore:Invalid value for VR DT:UserWarning")]

STEPS = table_of(ScheduledStep)
WORKITEMS = table_of(UpsWorkitem)
NOW = datetime(2026, 12, 5, 8, 0, 0)
DATES = ["20261204", "20261205", "20261205", "20261206", "", "2026120"]  # "": no start; "2026120": unreadable
TIMES = ["", "000000", "235959", "0930", "093000.5", "23", "120000", "0000", "2359"]
STATIONS = ["CT01", "CT01", "CT02", "", ""]
MODALITIES = ["CT", "MR", "CT01", ""]
NAMES = ["DOE^JANE", "doe^jane", "DOE^JANE^^", "SMITH^JOHN", "DOE"]
STATION_NAMES = ["", "", "SCANNER1"]


def _step_item(rng: random.Random, number: int) -> tuple[PatientRecord, OrderRecord]:
    """An HL7-like order of one step with a random start, station, modality and patient."""
    sps_id = f"S{number:05d}"
    study_uid = f"1.2.826.0.1.3680043.10.999.{number}"
    sps: JsonDataset = {
        tag_of("ScheduledProcedureStepID"): element("ScheduledProcedureStepID", sps_id),
        tag_of("ScheduledProcedureStepStartDate"): element("ScheduledProcedureStepStartDate", rng.choice(DATES)),
        tag_of("ScheduledProcedureStepStartTime"): element("ScheduledProcedureStepStartTime", rng.choice(TIMES)),
        tag_of("ScheduledStationAETitle"): element("ScheduledStationAETitle", rng.choice(STATIONS)),
        tag_of("ScheduledStationName"): element("ScheduledStationName", rng.choice(STATION_NAMES)),
        tag_of("Modality"): element("Modality", rng.choice(MODALITIES)),
        tag_of("ScheduledProcedureStepDescription"): element("ScheduledProcedureStepDescription", "CT HEAD"),
    }
    accession = f"A{number:05d}"
    item: JsonDataset = {
        tag_of("AccessionNumber"): element("AccessionNumber", accession),
        tag_of("RequestedProcedureID"): element("RequestedProcedureID", f"R{number:05d}"),
        tag_of("RequestedProcedureDescription"): element("RequestedProcedureDescription", "CT HEAD"),
        tag_of("StudyInstanceUID"): element("StudyInstanceUID", study_uid),
        tag_of("ScheduledProcedureStepSequence"): element("ScheduledProcedureStepSequence", [sps]),
    }
    patient_id = f"P{number % 40:03d}"
    patient = PatientRecord(PatientKey(patient_id, "CITY"), {
        tag_of("PatientName"): element("PatientName", rng.choice(NAMES))})
    order = OrderRecord(f"O{number:05d}", "", "", "", "NW", "SC", [ProcedureRecord(
        f"R{number:05d}", accession, study_uid, "CT HEAD", [StepRecord(sps_id, dict(sorted(item.items())))])])
    return patient, order


def _create(service: UpsService, number: int, label: str, start: str) -> str:
    """A UPS N-CREATE'd workitem (Worklist Label and start in its stored attributes)."""
    ds = Dataset()
    ds.ProcedureStepState = "SCHEDULED"
    ds.ScheduledProcedureStepPriority = "MEDIUM"
    ds.ProcedureStepLabel = "AI TRIAGE"
    ds.WorklistLabel = label
    ds.InputReadinessState = "READY"
    ds.ScheduledProcedureStepStartDateTime = start
    ds.PatientName = "DOE^JANE"
    ds.PatientID = f"U{number:03d}"
    uid = str(generate_uid(entropy_srcs=[f"h1-{number}"]))
    assert service.create(uid, ds, "AISCU").status == 0
    return uid


def _overrides(rng: random.Random) -> Dataset:
    ds = Dataset()
    choice = rng.randrange(4)
    if choice in (0, 2):
        ds.WorklistLabel = rng.choice(["CT01", "XR9", ""])
    if choice in (1, 2):
        ds.ScheduledProcedureStepStartDateTime = rng.choice(["20261205120000", "20261207", "20261204235959", ""])
    if choice == 3:
        station = Dataset()
        station.CodeValue = "SCANNER1"
        station.CodingSchemeDesignator = "99LOCAL"
        ds.ScheduledStationNameCodeSequence = [station]
    return ds


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def steps(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """300 HL7-like steps (a fifth changed by UPS N-SET, a few claimed) and 30 UPS N-CREATE'd ones."""
    urls = module_database(request.param, tmp_path_factory, "ups_prefilter")
    engine = make_engine(next(urls))
    try:
        migrate.upgrade(engine)
        service = UpsService(engine, clock=lambda: NOW)
        rng = random.Random(20261205)
        for number in range(300):
            patient, order = _step_item(rng, number)
            service.in_transaction(partial(_place, patient=patient, order=order), "test.place")
        for number in range(30):
            _create(service, number, rng.choice(["CT01", "CT", "XR9"]),
                    rng.choice(["20261205000000", "20261205", "20261204235959", "20261205093000.5", "20261206"]))
        with engine.connect() as db:
            hl7 = db.execute(select(STEPS.c.ups_instance_uid).where(STEPS.c.sps_id.like("S%"))
                             .order_by(STEPS.c.id)).scalars().all()
        for uid in rng.sample(hl7, 60):
            assert service.set(uid, _overrides(rng), "AISCU").status == 0
        for uid in rng.sample(hl7, 10):
            claim = Dataset()
            claim.ProcedureStepState = "IN PROGRESS"
            claim.TransactionUID = str(generate_uid())
            assert service.action(uid, 1, claim, "PERFORMER").status == 0
        yield engine
    finally:
        engine.dispose()
        for _ in urls:  # drops the PostgreSQL database
            pass


def _place(db: Connection, patient: PatientRecord, order: OrderRecord) -> Outcome:
    """An order placed as the HL7 intake places it (no UPS activity: no ups_workitems row)."""
    WorklistService(db, lambda: NOW).place_order(patient, order, "RIS", Cause("test order"))
    return Outcome(0)


def _query(**keys: Any) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _code(value: str) -> list[Dataset]:
    item = Dataset()
    item.CodeValue = value
    return [item]


def _request(accession: str) -> list[Dataset]:
    item = Dataset()
    item.AccessionNumber = accession
    return [item]


QUERIES: dict[str, Dataset] = {
    "station-today": _query(WorklistLabel="CT01",
                            ScheduledProcedureStepStartDateTime="20261205000000-20261205235959"),
    "modality-label-date-range": _query(WorklistLabel="CT", ScheduledProcedureStepStartDateTime="20261205-20261205"),
    "override-only-label": _query(WorklistLabel="XR9"),
    "single-date": _query(ScheduledProcedureStepStartDateTime="20261205"),
    "single-midnight": _query(ScheduledProcedureStepStartDateTime="20261205000000"),
    "across-midnight": _query(ScheduledProcedureStepStartDateTime="20261204235959-20261205000000"),
    "open-high": _query(ScheduledProcedureStepStartDateTime="-20261205"),
    "open-low": _query(ScheduledProcedureStepStartDateTime="20261205120000-"),
    "hour": _query(ScheduledProcedureStepStartDateTime="2026120509-2026120509"),
    "fraction": _query(ScheduledProcedureStepStartDateTime="20261205093000.5-20261205093000.5"),
    "last-second": _query(ScheduledProcedureStepStartDateTime="20261205235959-20261205235959.999999"),
    "offset": _query(ScheduledProcedureStepStartDateTime="20261205000000+0100-20261205120000+0100"),
    "reversed": _query(ScheduledProcedureStepStartDateTime="20261206-20261205"),
    "wildcard-label": _query(WorklistLabel="CT*", ScheduledProcedureStepStartDateTime="20261205-"),
    "patient-name": _query(PatientName="DOE^JANE"),
    "patient-name-lower": _query(PatientName="doe^jane", WorklistLabel="CT01"),
    "patient-name-family": _query(PatientName="DOE"),
    "state-and-label": _query(ProcedureStepState="SCHEDULED", WorklistLabel="CT01",
                              ScheduledProcedureStepStartDateTime="20261205-20261206"),
    "in-progress": _query(ProcedureStepState="IN PROGRESS"),
    "station-code": _query(ScheduledStationNameCodeSequence=_code("SCANNER1")),
    "station-code-ae": _query(ScheduledStationNameCodeSequence=_code("CT02"),
                              ScheduledProcedureStepStartDateTime="20261204-20261206"),
    "accession": _query(ReferencedRequestSequence=_request("A00007")),
    "patient-and-issuer": _query(PatientID="P007", IssuerOfPatientID="CITY"),
    "universal-start": _query(WorklistLabel="CT01", ScheduledProcedureStepStartDateTime=""),
}


def _brute_force(engine: Engine, identifier: Dataset) -> list[str]:
    """The SOP Instance UIDs whose UPS view matches, in step order: every step read, no SQL filter."""
    query = identifier.to_json_dict()
    with engine.connect() as db:
        rows = db.execute(select(STEPS.c.ups_instance_uid, STEPS.c.item, STEPS.c.sps_status,
                                 WORKITEMS.c.attributes)
                          .select_from(STEPS.outerjoin(WORKITEMS, WORKITEMS.c.step_fk == STEPS.c.id))
                          .order_by(STEPS.c.id)).all()
    found = []
    for uid, item, status, attributes in rows:
        item = item if isinstance(item, dict) else orjson.loads(item)
        if ups_matching.dataset_matches(query, ups_view.workitem(uid, item, status, attributes)):
            found.append(uid)
    return found


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_find_answers_what_matching_every_view_would(steps: Engine, name: str) -> None:
    identifier = QUERIES[name]
    expected = _brute_force(steps, identifier)
    answered = [str(ds.SOPInstanceUID) for ds in UpsService(steps).find(identifier)]
    assert answered == expected


def test_the_table_covers_overrides_boundaries_and_empty_answers(steps: Engine) -> None:
    """The data and queries exercise what the pre-filter must get right: matches made only by a UPS
    override, matches at midnight, and queries with and without answers."""
    answers = {name: _brute_force(steps, q) for name, q in QUERIES.items()}
    assert answers["override-only-label"], "no step got its Worklist Label from N-SET / N-CREATE"
    assert answers["station-today"] and answers["single-midnight"] and answers["across-midnight"]
    assert answers["fraction"] and answers["hour"] and answers["patient-name-lower"]
    assert not answers["reversed"]
    with steps.connect() as db:
        overridden = db.execute(select(WORKITEMS.c.attributes)).scalars().all()
    assert any(tag_of("ScheduledProcedureStepStartDateTime") in (a if isinstance(a, dict) else orjson.loads(a))
               for a in overridden)


def test_the_prefilter_narrows_the_typical_query(steps: Engine) -> None:
    """Station + today reads a small part of the steps: those whose columns match, plus those whose
    workitem overrides Worklist Label or the start."""
    query = QUERIES["station-today"].to_json_dict()
    with steps.connect() as db:
        candidates = db.execute(prefilter.candidate_ids(prefilter.build(query), steps.dialect.name)).scalars().all()
        total = len(db.execute(select(STEPS.c.id)).all())
    assert set(_brute_force_ids(steps, QUERIES["station-today"])) <= set(candidates)
    assert len(candidates) < total / 2  # a third of the steps have a workitem here, far more than usual


def _brute_force_ids(engine: Engine, identifier: Dataset) -> list[int]:
    uids = set(_brute_force(engine, identifier))
    with engine.connect() as db:
        return [i for i, uid in db.execute(select(STEPS.c.id, STEPS.c.ups_instance_uid)).all() if uid in uids]
