"""DICOMweb searches against a real broker: the HTTP server (uvicorn) and the DICOM AE side by side on
one database (SQLite and PostgreSQL), loaded with the orders of the worklist SCP tests.

* ``GET /dicomweb/mwlitems`` answers, for every matching rule of test_mwl_scp, exactly the items and
  attributes a pynetdicom C-FIND with the same keys answers (compared dataset by dataset after
  ``Dataset.from_json``), with the return keys a modality typically asks for written out here.
* ``GET /dicomweb/workitems`` (UPS-RS Search) answers what a UPS C-FIND with the same identifier
  answers; it is driven through dicomweb-client's own DICOM JSON GET, paging with ``offset`` as the
  client does (the client has no UPS-RS call: its ``_http_get_application_json`` with
  ``parse_query_parameters`` is what its QIDO searches use), and through httpx.
* Paging (limit, offset, the Warning of more results, 204 past the end), refusals (400 with the
  reason, 401, 406), and a Query audit record naming the patients of each search.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.uri import parse_query_parameters
from pydicom.dataset import Dataset
from pynetdicom import AE, Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityWorklistInformationFind,
    UnifiedProcedureStepPull,
)
from requests import HTTPError
from sqlalchemy import Engine, select

from broker.audit.events import QUERY
from broker.config import load_settings
from broker.dicom.workflow import build_workflow
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.store import migrate
from broker.store.session import make_engine
from broker.store.tables import AuditRecord, AuditRecordPatient, table_of
from broker.web.dicomweb.qido import UPS, parse_search
from broker.web.dicomweb.search import MORE_RESULTS
from tests.conftest import module_database
from tests.dicom_support import dicom_server
from tests.integration.test_mwl_scp import ORDERS, RULES, Rule
from tests.mwl_support import place
from tests.ports import free_port
from tests.web_support import web_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180),
              pytest.mark.filterwarnings("ignore:Invalid value for VR")]

READ = "read-token-0123456789"
AS_READER = {"Authorization": f"Bearer {READ}"}
SPS = "ScheduledProcedureStepSequence"


@dataclass
class Broker:
    """The loaded database, the DICOM AE (worklist and UPS) and the HTTP server on it."""

    engine: Engine
    dicom_port: int
    base: str  # http://127.0.0.1:<port>/dicomweb


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           mappings: MappingSet) -> Iterator[Broker]:
    urls = module_database(request.param, tmp_path_factory, "dicomweb-search")
    url = next(urls)
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        place(Intake(engine, mappings), *ORDERS)
        settings = load_settings(database_url=url, redis_url="", dicom_host="127.0.0.1", dicom_port=free_port(),
                                 http_host="127.0.0.1", http_port=free_port(), api_tokens=f"{READ}:read",
                                 audit_enabled=True, audit_flush_interval=0.05)
        with dicom_server(settings, url, build_workflow(settings, engine)) as dicom, web_server(settings) as web:
            yield Broker(engine, dicom.port, f"http://127.0.0.1:{web.server.port}/dicomweb")
    finally:
        engine.dispose()
        next(urls, None)


# --- helpers -------------------------------------------------------------------------------------------
def c_find(port: int, identifier: Dataset, model: Any) -> list[Dataset]:
    """The pending responses of one C-FIND (pynetdicom on its own association)."""
    ae = AE(ae_title="WEBTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(model)
    assoc: Association = ae.associate("127.0.0.1", port, ae_title="BROKER")
    assert assoc.is_established
    try:
        found: list[Dataset] = []
        for status, response in assoc.send_c_find(identifier, model):
            assert status, "no C-FIND response"
            if status.Status in (0xFF00, 0xFF01):
                assert response is not None
                found.append(response)
            else:
                assert status.Status == 0x0000, hex(status.Status)
        return found
    finally:
        assoc.release()


def modality_identifier(top: dict[str, str], sps: dict[str, str]) -> Dataset:
    """A worklist C-FIND as a modality writes it: the usual return keys, ``top`` and ``sps`` as matching keys
    (the return keys the HTTP search answers with by default, written out independently)."""
    ds = Dataset()
    for keyword in ("AccessionNumber", "ReferringPhysicianName", "PatientName", "PatientID", "IssuerOfPatientID",
                    "PatientBirthDate", "PatientSex", "StudyInstanceUID", "RequestingPhysician",
                    "RequestedProcedureDescription", "RequestedProcedureID", "RequestedProcedurePriority",
                    "AdmissionID", "CurrentPatientLocation"):
        setattr(ds, keyword, "")
    ds.RequestedProcedureCodeSequence = []
    step = Dataset()
    for keyword in ("Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
                    "ScheduledProcedureStepStartTime", "ScheduledPerformingPhysicianName",
                    "ScheduledProcedureStepDescription", "ScheduledProcedureStepID", "ScheduledStationName",
                    "ScheduledProcedureStepLocation", "ScheduledProcedureStepStatus"):
        setattr(step, keyword, "")
    step.ScheduledProtocolCodeSequence = []
    for keyword, value in sps.items():
        setattr(step, keyword, value)
    for keyword, value in top.items():
        setattr(ds, keyword, value)
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def http_params(rule: Rule) -> dict[str, str]:
    """The same keys as QIDO-RS parameters (a UID list comma-separated, SPS keys as dotted paths)."""
    params = {k: v.replace("\\", ",") for k, v in rule.top.items()}
    params.update({f"{SPS}.{k}": v for k, v in rule.sps.items()})
    return params


def get(broker: Broker, resource: str, params: Any = None, **headers: str) -> httpx.Response:
    return httpx.get(f"{broker.base}/{resource}", params=params, headers={**AS_READER, **headers}, timeout=30)


def datasets(answer: httpx.Response) -> list[Dataset]:
    """The answer's DICOM JSON, each result read back by pydicom ([] for 204)."""
    if answer.status_code == 204:
        assert answer.content == b""
        return []
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom+json"
    body = answer.json()
    assert isinstance(body, list) and body
    return [Dataset.from_json(item) for item in body]


def canonical(ds: Dataset) -> dict[str, Any]:
    """A dataset as DICOM JSON, so that one read off the wire and one read from JSON compare equal."""
    return Dataset.from_json(ds.to_json_dict()).to_json_dict()


def sps_id(ds: Dataset) -> str:
    return str(ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID)


# --- the Modality Worklist -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RULES))
def test_mwl_search_answers_exactly_what_c_find_answers(broker: Broker, name: str) -> None:
    rule = RULES[name]
    dimse = c_find(broker.dicom_port, modality_identifier(rule.top, rule.sps), ModalityWorklistInformationFind)
    web = datasets(get(broker, "mwlitems", http_params(rule)))
    assert {sps_id(d) for d in web} == {sps_id(d) for d in dimse} == rule.expected
    assert {sps_id(d): canonical(d) for d in web} == {sps_id(d): canonical(d) for d in dimse}


def test_mwl_search_by_tag_and_includefield_returns_more_keys(broker: Broker) -> None:
    answer = get(broker, "mwlitems", [("00100020", "PID-66"),
                                      ("includefield", "PlacerOrderNumberImagingServiceRequest"),
                                      ("includefield", f"{SPS}.ScheduledProcedureStepDescription")])
    [item] = datasets(answer)
    assert item.PlacerOrderNumberImagingServiceRequest == "PLS6"
    assert "ScheduledProcedureStepDescription" in item.ScheduledProcedureStepSequence[0]
    [whole] = datasets(get(broker, "mwlitems", {"PatientID": "PID-66", "includefield": "all"}))
    assert whole.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "MR1"
    assert "FillerOrderNumberImagingServiceRequest" in whole


def test_mwl_keys_it_cannot_match_on_are_ignored_and_named_as_c_find_does(broker: Broker) -> None:
    answer = get(broker, "mwlitems", {"PatientID": "PID-66", "PatientWeight": "70"})
    [item] = datasets(answer)
    assert "PatientWeight" in item and "PatientWeight" in answer.headers["warning"]
    assert "(FF01)" not in answer.headers["warning"]


# --- UPS-RS Search -------------------------------------------------------------------------------------
UPS_QUERIES: dict[str, dict[str, str]] = {
    "everything": {},
    "state": {"ProcedureStepState": "SCHEDULED"},
    "patient-id": {"PatientID": "PID-66"},
    "name-wildcard": {"PatientName": "DOE*"},
    "start-range": {"ScheduledProcedureStepStartDateTime": "20261124000000-20261125235959"},
    "station-in-sequence": {"ScheduledStationNameCodeSequence.CodeValue": "MR1"},
    "label-and-state": {"ProcedureStepState": "SCHEDULED", "WorklistLabel": "US2"},
}


@pytest.mark.parametrize("name", list(UPS_QUERIES))
def test_ups_search_answers_what_ups_c_find_answers(broker: Broker, name: str) -> None:
    params = UPS_QUERIES[name]
    dimse = c_find(broker.dicom_port, parse_search(params.items(), UPS).identifier, UnifiedProcedureStepPull)
    client = DICOMwebClient(broker.base, headers=AS_READER)
    # dicomweb-client's DICOM JSON GET, paging with offset until the 204, 7 at a time
    found = client._http_get_application_json(f"{broker.base}/workitems",
                                              params={**parse_query_parameters(limit=7), **params},
                                              get_remaining=True)
    web = [Dataset.from_json(item) for item in found]
    assert len(web) == len(dimse) > 0
    key = "SOPInstanceUID"
    assert {str(d[key].value): canonical(d) for d in web} == {str(d[key].value): canonical(d) for d in dimse}
    assert all("TransactionUID" not in d for d in web)


def test_ups_search_refuses_a_key_it_cannot_use(broker: Broker) -> None:
    answer = get(broker, "workitems", {"PatientID": "A\\B"})
    assert answer.status_code == 400
    assert "one value" in answer.json()["detail"] and "one value" in answer.headers["warning"]
    client = DICOMwebClient(broker.base, headers=AS_READER)
    with pytest.raises(HTTPError):
        client._http_get_application_json(f"{broker.base}/workitems", params={"NoSuchAttribute": "1"})


# --- paging, refusals, audit ------------------------------------------------------------------------------
def test_limit_and_offset_page_through_the_same_order_with_the_warning_until_the_end(broker: Broker) -> None:
    everything = [sps_id(d) for d in datasets(get(broker, "mwlitems"))]
    assert len(everything) == len(ORDERS) - 1  # the cancelled S7 is hidden, as in C-FIND
    pages: list[str] = []
    offset = 0
    while True:
        answer = get(broker, "mwlitems", {"limit": 15, "offset": offset})
        if answer.status_code == 204:
            break
        page = [sps_id(d) for d in datasets(answer)]
        more = offset + len(page) < len(everything)
        assert (MORE_RESULTS in answer.headers.get("warning", "")) == more
        assert answer.headers.get("warning", "").startswith("299 127.0.0.1:") or not more
        pages += page
        offset += len(page)
    assert pages == everything
    assert get(broker, "mwlitems", {"offset": 10_000}).status_code == 204
    assert get(broker, "mwlitems", {"PatientID": "NOBODY"}).status_code == 204


def test_an_answer_does_not_wait_for_the_clients_delayed_ack(broker: Broker) -> None:
    """With Nagle on the server's connections, every answer waited ~40 ms for the client's delayed ACK
    between the head and the body (the listener was not made with IPPROTO_TCP, so asyncio left Nagle on)."""
    with httpx.Client(base_url=broker.base, headers=AS_READER, timeout=10) as client:
        times = []
        for _ in range(11):
            started = time.perf_counter()
            assert client.get("/mwlitems", params={"PatientID": "PID-66"}).status_code == 200
            times.append(time.perf_counter() - started)
    assert sorted(times)[5] < 0.030, sorted(times)


def test_refusals_say_why(broker: Broker) -> None:
    for resource, params, status, reason in [
        ("mwlitems", {"NoSuchAttribute": "1"}, 400, "unknown attribute 'NoSuchAttribute'"),
        ("mwlitems", {f"{SPS}.ScheduledProcedureStepStartDate": "20261125-20261120"}, 400, "ends before it starts"),
        ("mwlitems", {"limit": "many"}, 400, "limit must be an unsigned integer"),
        ("workitems", {"PatientID.CodeValue": "1"}, 400, "PatientID is not a sequence"),
        ("workitems", {"fuzzymatching": "maybe"}, 400, "fuzzymatching must be true or false"),
    ]:
        answer = get(broker, resource, params)
        assert answer.status_code == status, (params, answer.text)
        assert reason in answer.json()["detail"], answer.text
        assert answer.headers["warning"].startswith("299 ") and reason in answer.headers["warning"]
    assert httpx.get(f"{broker.base}/mwlitems", timeout=10).status_code == 401
    refused = get(broker, "workitems", accept="multipart/related; type=\"application/dicom+xml\"")
    assert refused.status_code == 406
    fuzzy = get(broker, "mwlitems", {"PatientID": "PID-66", "fuzzymatching": "true"})
    assert fuzzy.status_code == 200 and "fuzzymatching parameter is not supported" in fuzzy.headers["warning"]
    assert fuzzy.headers["cache-control"] == "no-store"


def test_each_search_is_a_query_audit_record_naming_its_patients(broker: Broker) -> None:
    for resource in ("mwlitems", "workitems"):
        assert get(broker, resource, {"PatientID": "PID-66", "limit": 1}).status_code == 200
    records, patients = table_of(AuditRecord), table_of(AuditRecordPatient)
    deadline = time.monotonic() + 10
    while True:
        with broker.engine.connect() as db:
            events = dict(db.execute(select(records.c.id, records.c.event).where(records.c.event_id == QUERY[0])).all())
            named: dict[int, set[str]] = {}
            for record, patient in db.execute(select(patients.c.record_id, patients.c.patient_id)):
                named.setdefault(record, set()).add(patient)
        # the searches of PID-66 alone: the records naming exactly that patient (the trail indexes the
        # Patient ID with and without its issuer), by path
        paths = {resource for record, event in events.items() if named.get(record) == {"PID-66", "PID-66^^^CITYMED"}
                 for resource in ("/dicomweb/mwlitems", "/dicomweb/workitems") if resource in str(event)}
        if len(paths) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert paths == {"/dicomweb/mwlitems", "/dicomweb/workitems"}
