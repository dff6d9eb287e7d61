"""The worklist SCP over the network: DCMTK ``findscu -W`` and pynetdicom as modalities.

Items are created through the real HL7 listener (MLLP over TCP); the broker's DICOM AE runs on a
free port on each database. Every matching rule is asked by both clients; the station-only view,
C-CANCEL, statuses and character sets by pynetdicom; the rejections of the association limit and the
allow-list are read off the wire (test_dicom_acceptor.associate_raw).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import module_database
from mwl_support import UID_PREFIX, Order, send
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine

from broker.config import load_settings
from broker.dicom import pdu
from broker.dicom.association import REJECT_CALLING_AE_NOT_RECOGNIZED, REJECT_LOCAL_LIMIT_EXCEEDED
from broker.dicom.server import DicomServer
from broker.hl7.mllp import MLLPServer, run_in_thread
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.store import migrate
from broker.store.session import make_engine
from tests.integration.test_dicom_acceptor import associate_raw
from tests.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Invalid value for VR")]

FINDSCU = shutil.which("findscu") or "findscu"
ECHOSCU = shutil.which("echoscu") or "echoscu"
DAY = "20261123"
BULK = 40  # steps on station BULK, for C-CANCEL

ORDERS = [
    Order("S1", "CT01", "CT", start=f"{DAY}090000", name="DOE^JANE", performing="GREY^MEREDITH"),
    Order("S2", "CT01", "CT", start=f"{DAY}140000", name="ROE^RICHARD"),
    Order("S3", "CT01", "MR", start=f"{DAY}100000", name="DOE^JOHN", performing="GREYSON^DEREK"),
    Order("S4", "CT01", "CT", start="20261124083000", name="SMITH^ANNA"),
    Order("S5", "MR1", "MR", start="20261122230000", name="MÜLLER^ERIKA", charset="8859/1"),
    Order("S6", "MR1", "MR", start="20261125120000", name="DOE^JANE", patient_id="PID-66",
          study_uid=UID_PREFIX + "6006"),
    Order("S7", "CT01", "CT", start=f"{DAY}110000", name="DOE^JANE", then=("CA^CA",)),
    Order("S8", "US2", "US", start=f"{DAY}080000", name="DOE^JAN", accession="ACC-8",
          study_uid=UID_PREFIX + "8008"),
    Order("S9", "CT01", "CT", start="", name="NODATE^NORA"),
    *(Order(f"B{n:02d}", "BULK", "CR", start=f"{DAY}{7 + n // 10:02d}{n % 10 * 5:02d}00") for n in range(BULK)),
]


@dataclass(frozen=True)
class Rule:
    """A query: top-level keys and SPS item keys (values as DICOM strings) and the SPS IDs it must return."""

    top: dict[str, str]
    sps: dict[str, str]
    expected: set[str]


RULES: dict[str, Rule] = {
    "single-value-station-ae": Rule({}, {"ScheduledStationAETitle": "MR1"}, {"S5", "S6"}),
    "single-value-modality": Rule({}, {"ScheduledStationAETitle": "CT01", "Modality": "MR"}, {"S3"}),
    "single-value-patient-id": Rule({"PatientID": "PID-66"}, {}, {"S6"}),
    "single-value-patient-name-case-insensitive": Rule({"PatientName": "doe^john"}, {}, {"S3"}),
    "single-value-is-case-sensitive-on-non-pn": Rule({}, {"ScheduledStationAETitle": "ct01"}, set()),
    "single-value-performing-physician": Rule({}, {"ScheduledPerformingPhysicianName": "GREY^MEREDITH"}, {"S1"}),
    "single-value-start-date-is-the-whole-day": Rule(
        {}, {"ScheduledStationAETitle": "CT01", "ScheduledProcedureStepStartDate": DAY}, {"S1", "S2", "S3"}),
    "wildcard-star": Rule({"PatientName": "DOE*"}, {"ScheduledStationAETitle": "CT01"}, {"S1", "S3"}),
    "wildcard-question-mark": Rule({"PatientName": "DOE^JA?"}, {}, {"S8"}),
    "wildcard-performing-physician": Rule({}, {"ScheduledPerformingPhysicianName": "GREY*"}, {"S1", "S3"}),
    "closed-date-range": Rule({}, {"ScheduledProcedureStepStartDate": "20261124-20261125"}, {"S4", "S6"}),
    "open-date-range-to": Rule({}, {"ScheduledProcedureStepStartDate": "-20261122"}, {"S5"}),
    "open-date-range-from": Rule({}, {"ScheduledProcedureStepStartDate": "20261125-"}, {"S6"}),
    "combined-date-time-range": Rule(
        {}, {"ScheduledStationAETitle": "CT01", "ScheduledProcedureStepStartDate": f"{DAY}-20261124",
             "ScheduledProcedureStepStartTime": "1000-0900"}, {"S3", "S2", "S4"}),
    "uid-list": Rule({"StudyInstanceUID": f"{UID_PREFIX}6006\\{UID_PREFIX}8008"}, {}, {"S6", "S8"}),
    "optional-key-accession-number": Rule({"AccessionNumber": "ACC-8"}, {}, {"S8"}),
    "universal-matching": Rule({"PatientName": ""}, {"ScheduledStationAETitle": ""}, {o.sps for o in ORDERS} - {"S7"}),
    "hidden-status-asked-for": Rule({}, {"ScheduledProcedureStepStatus": "CANCELED"}, {"S7"}),
    "stored-empty-value-does-not-match": Rule(
        {}, {"ScheduledStationAETitle": "CT01", "ScheduledProcedureStepStartDate": "-20261231"},
        {"S1", "S2", "S3", "S4"}),
}



@dataclass
class Worklist:
    """A loaded database and the broker's AE serving it."""

    engine: Engine
    port: int


def start_server(engine: Engine, **settings: Any) -> DicomServer:
    server = DicomServer(load_settings(dicom_host="127.0.0.1", dicom_port=free_port(), **settings), engine)
    server.start()
    return server


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def worklist(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             mappings: MappingSet) -> Iterator[Worklist]:
    """Each database, loaded with :data:`ORDERS` over MLLP, served by the broker's AE."""
    urls = module_database(request.param, tmp_path_factory, "scp")
    url = next(urls)
    engine = make_engine(url)
    reader = make_engine(url, for_reading=True)
    try:
        migrate.upgrade(engine)
        listener = run_in_thread(MLLPServer(Intake(engine, mappings), host="127.0.0.1", port=0, workers=2))
        try:
            send(listener.port, *ORDERS)
        finally:
            listener.stop()
        server = start_server(reader)
        try:
            yield Worklist(reader, server.port)
        finally:
            server.stop()
    finally:
        reader.dispose()
        engine.dispose()
        for _ in urls:  # drops the PostgreSQL database
            pass


# --- clients ---------------------------------------------------------------------------------------
def findscu(port: int, rule: Rule, out: Path, *extra: str) -> list[Dataset]:
    """Run DCMTK findscu -W with the rule's keys (asking SPS ID back); the responses it extracted."""
    keys = [f"{k}={v}" for k, v in rule.top.items()]
    keys += [f"ScheduledProcedureStepSequence[0].{k}={v}" for k, v in rule.sps.items()]
    keys.append("ScheduledProcedureStepSequence[0].ScheduledProcedureStepID")
    args = [FINDSCU, "-W", "-aet", "FINDSCU", "-aec", "BROKER", "-to", "30", "-X", "-od", str(out), *extra]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "LANG": "C"})
    assert result.returncode == 0, result.stderr
    return [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def query(rule: Rule) -> Dataset:
    identifier = Dataset()
    for keyword, value in rule.top.items():
        setattr(identifier, keyword, value)
    step = Dataset()
    for keyword, value in rule.sps.items():
        setattr(step, keyword, value)
    step.ScheduledProcedureStepID = ""
    identifier.ScheduledProcedureStepSequence = [step]
    return identifier


def associate(port: int, calling: str = "PYNETDICOM", contexts: list[str] | None = None) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityWorklistInformationFind, contexts or [ExplicitVRLittleEndian,
                                                                            ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", port, ae_title="BROKER")


def c_find(port: int, identifier: Dataset, calling: str = "PYNETDICOM") -> tuple[list[int], list[Dataset], Dataset]:
    """Pending statuses, the identifiers with them, and the final status dataset."""
    assoc = associate(port, calling)
    assert assoc.is_established
    try:
        pending, found, final = [], [], Dataset()
        for status, dataset in assoc.send_c_find(identifier, ModalityWorklistInformationFind):
            assert status is not None, "no response"
            if status.Status in (0xFF00, 0xFF01):
                pending.append(int(status.Status))
                found.append(dataset)
            else:
                final = status
        return pending, found, final
    finally:
        assoc.release()


def sps_ids(responses: list[Dataset]) -> list[str]:
    return [str(r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID) for r in responses]


# --- every matching rule, by both clients -----------------------------------------------------------
@pytest.mark.parametrize("name", list(RULES))
def test_rule_with_findscu(worklist: Worklist, name: str, tmp_path: Path) -> None:
    rule = RULES[name]
    ids = sps_ids(findscu(worklist.port, rule, tmp_path))
    assert sorted(ids) == sorted(rule.expected)  # and one response per step: no repeats


@pytest.mark.parametrize("name", list(RULES))
def test_rule_with_pynetdicom(worklist: Worklist, name: str) -> None:
    rule = RULES[name]
    pending, found, final = c_find(worklist.port, query(rule))
    assert sorted(sps_ids(found)) == sorted(rule.expected)
    assert set(pending) <= {0xFF00} and final.Status == 0x0000


# --- what comes back ---------------------------------------------------------------------------------
def test_only_requested_attributes_come_back(worklist: Worklist, tmp_path: Path) -> None:
    rule = Rule({"PatientName": "", "PatientID": "PID-66", "ReferringPhysicianName": ""}, {"Modality": ""}, {"S6"})
    [response] = findscu(worklist.port, rule, tmp_path)
    assert {e.keyword for e in response} == {"SpecificCharacterSet", "PatientName", "PatientID",
                                             "ReferringPhysicianName", "ScheduledProcedureStepSequence"}
    assert response.ReferringPhysicianName == ""  # Type 2, unknown: present and empty
    [step] = response.ScheduledProcedureStepSequence
    assert {e.keyword for e in step} == {"Modality", "ScheduledProcedureStepID"}
    assert (str(response.PatientName), step.Modality) == ("DOE^JANE", "MR")


def test_latin_1_name_comes_back_in_its_character_set(worklist: Worklist) -> None:
    _, [response], _ = c_find(worklist.port, query(Rule({"PatientName": ""}, {"ScheduledStationAETitle": "MR1",
                                                          "ScheduledProcedureStepStartDate": "20261122"}, set())))
    assert response.SpecificCharacterSet == "ISO_IR 100"
    assert str(response.PatientName) == "MÜLLER^ERIKA"


def test_query_in_latin_1_matches(worklist: Worklist) -> None:
    # pydicom encodes the key in ISO 8859-1 as the identifier's Specific Character Set says.
    rule = Rule({"SpecificCharacterSet": "ISO_IR 100", "PatientName": "müller*"}, {}, {"S5"})
    _, found, _ = c_find(worklist.port, query(rule))
    assert sps_ids(found) == ["S5"]


def test_uids_are_stable_across_queries(worklist: Worklist) -> None:
    rule = Rule({"StudyInstanceUID": ""}, {"ScheduledStationAETitle": "CT01"}, set())
    first = {sps_ids([r])[0]: r.StudyInstanceUID for r in c_find(worklist.port, query(rule))[1]}
    second = {sps_ids([r])[0]: r.StudyInstanceUID for r in c_find(worklist.port, query(rule))[1]}
    assert first == second and len(first) == 5


# --- statuses ----------------------------------------------------------------------------------------
def test_unsupported_optional_key_answers_ff01(worklist: Worklist) -> None:
    identifier = query(Rule({"PatientID": "PID-66", "RequestedProcedurePriority": "STAT"}, {}, set()))
    pending, found, final = c_find(worklist.port, identifier)
    assert pending == [0xFF01] and sps_ids(found) == ["S6"] and final.Status == 0x0000


def test_invalid_identifier_gets_a900_with_error_comment(worklist: Worklist) -> None:
    identifier = query(Rule({}, {}, set()))
    identifier.ScheduledProcedureStepSequence.append(Dataset())  # two SPS items
    pending, _, final = c_find(worklist.port, identifier)
    assert pending == [] and final.Status == 0xA900 and final.ErrorComment


def test_bad_range_gets_c000_with_error_comment(worklist: Worklist) -> None:
    pending, _, final = c_find(worklist.port, query(Rule({}, {"ScheduledProcedureStepStartDate": "2026-11-23"},
                                                         set())))
    assert pending == [] and final.Status == 0xC000
    assert "ScheduledProcedureStepStartDate" in final.ErrorComment


def test_c_cancel_stops_the_responses_with_fe00(worklist: Worklist) -> None:
    server = start_server(worklist.engine, mwl_page_size=1)  # one read per response: slow enough to cancel
    try:
        assoc = associate(server.port)
        assert assoc.is_established
        context_id = assoc.accepted_contexts[0].context_id
        statuses = []
        for status, _ in assoc.send_c_find(query(Rule({}, {"ScheduledStationAETitle": "BULK"}, set())),
                                           ModalityWorklistInformationFind, msg_id=7):
            statuses.append(int(status.Status))
            if len(statuses) == 1:
                assoc.send_c_cancel(7, context_id)
        assoc.release()
    finally:
        server.stop()
    assert statuses[-1] == 0xFE00
    assert set(statuses[:-1]) == {0xFF00} and len(statuses) - 1 < BULK


def test_database_failure_gets_c001_with_error_comment(tmp_path: Path) -> None:
    unmigrated = make_engine(f"sqlite:///{tmp_path / 'empty.db'}", for_reading=True)
    server = start_server(unmigrated)
    try:
        pending, _, final = c_find(server.port, query(Rule({"PatientID": "X"}, {}, set())))
    finally:
        server.stop()
        unmigrated.dispose()
    assert pending == [] and final.Status == 0xC001 and "database" in final.ErrorComment


# --- the application entity --------------------------------------------------------------------------
def test_echoscu_verifies(worklist: Worklist) -> None:
    result = subprocess.run([ECHOSCU, "-aec", "BROKER", "127.0.0.1", str(worklist.port)], capture_output=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_both_transfer_syntaxes_are_accepted(worklist: Worklist, syntax: str) -> None:
    assoc = associate(worklist.port, contexts=[syntax])
    try:
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == ModalityWorklistInformationFind]
        assert [cx.transfer_syntax[0] for cx in accepted] == [syntax]
        responses = list(assoc.send_c_find(query(Rule({"PatientID": "PID-66"}, {}, set())),
                                           ModalityWorklistInformationFind))
        assert [int(s.Status) for s, _ in responses] == [0xFF00, 0x0000]
    finally:
        assoc.release()


def test_association_limit_rejects_cleanly_and_logs(worklist: Worklist) -> None:
    server = start_server(worklist.engine, dicom_max_associations=2)
    held: list[Association] = []
    try:
        held = [associate(server.port) for _ in range(2)]
        assert all(a.is_established for a in held)
        with structlog.testing.capture_logs() as logs:
            extra = associate_raw(server.port)
        assert extra == (pdu.A_ASSOCIATE_RJ, REJECT_LOCAL_LIMIT_EXCEEDED)
        assert any(e["event"] == "dicom.association_rejected" and e["reason"] == "local limit exceeded"
                   for e in logs)
        for assoc in held:
            assoc.release()
        held = []
        # The server ends a released association's thread a moment after the release: room comes back.
        for _ in range(50):
            again = associate(server.port)
            if again.is_established:
                again.release()
                break
            time.sleep(0.1)
        else:
            pytest.fail("no association accepted after the others were released")
    finally:
        for assoc in held:
            assoc.release()
        server.stop()


def test_allow_list_by_calling_ae_and_host(worklist: Worklist) -> None:
    server = start_server(worklist.engine, dicom_allowed_callers="CT01,MR1@10.9.9.9")
    try:
        allowed = associate(server.port, calling="CT01")
        assert allowed.is_established
        allowed.release()
        with structlog.testing.capture_logs() as logs:
            stranger = associate_raw(server.port, calling_ae="US9")
            wrong_host = associate_raw(server.port, calling_ae="MR1")
        assert stranger == wrong_host == (pdu.A_ASSOCIATE_RJ, REJECT_CALLING_AE_NOT_RECOGNIZED)
        refused = [e for e in logs if e["event"] == "dicom.association_refused"]
        assert [e["calling_ae"] for e in refused] == ["US9", "MR1"]
    finally:
        server.stop()


def test_station_sees_only_its_own_items(worklist: Worklist) -> None:
    server = start_server(worklist.engine, mwl_station_sees_own_items=True)
    try:
        _, found, _ = c_find(server.port, query(Rule({"PatientName": "DOE*"}, {}, set())), calling="MR1")
        _, found_ct, _ = c_find(server.port, query(Rule({"PatientName": "DOE*"}, {}, set())), calling="CT01")
    finally:
        server.stop()
    assert sorted(sps_ids(found)) == ["S6"]
    assert sorted(sps_ids(found_ct)) == ["S1", "S3"]


def test_concurrent_queries_each_get_their_answer(worklist: Worklist) -> None:
    rules = list(RULES.values())
    results: dict[int, list[str]] = {}

    def ask(n: int) -> None:
        results[n] = sps_ids(c_find(worklist.port, query(rules[n % len(rules)]))[1])

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert {n: sorted(ids) for n, ids in results.items()} == {
        n: sorted(rules[n % len(rules)].expected) for n in range(12)}
