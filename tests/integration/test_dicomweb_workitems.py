"""UPS-RS workitem transactions (PS3.18 11.4-11.8) on SQLite and PostgreSQL: every transaction and every
error status with its Warning, the same state table as the DIMSE UPS SCP (test_ups_scp.py), responses
that pydicom reads as DICOM JSON, the tokens' roles, the audit records of the token and client.

The status tables run through Starlette's TestClient (in-process HTTP, the real app on a real
database); the last tests start ``broker run`` and drive one workitem over UPS-RS with httpx and over
DIMSE with pynetdicom, as outside clients would, and watch it in the DIMSE UPS, the Modality Worklist
and the board.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]
from sqlalchemy import Engine

from broker.config import load_settings
from broker.domain.ups_identity import derived_ups_uid
from broker.mapping.rules import MappingSet
from broker.store.tables import OutboxEvent, ScheduledStep
from broker.web.app import create_app
from broker.web.auth import token_line
from tests.conftest import ROOT
from tests.dicom_support import free_port, wait_until
from tests.events_support import procedure_state, rows, schedule, step_status
from tests.integration.test_audit_records import Rec, recorded
from tests.integration.test_cli import BROKER, env_for, run_cli, wait_for_port
from tests.integration.test_ups_scp import (
    CHANGE_STATE,
    action,
    change_state,
    create,
    final_attributes,
    find,
    get,
    progress,
    ups_scu,
    workitem,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

READ = "read-token-dicomweb-0123"
WRITE = "write-token-dicomweb-0123"
PERFORMER = "perf-token-dicomweb-0123"
AUDITOR = "audit-token-dicomweb-0123"
AS_READER = {"Authorization": f"Bearer {READ}"}
AS_WRITER = {"Authorization": f"Bearer {WRITE}"}
AS_PERFORMER = {"Authorization": f"Bearer {PERFORMER}"}
DICOM_JSON = "application/dicom+json"
TRANSACTION_UID = "00081195"
STATE = "00741000"


def body(dataset: Dataset | dict[str, Any]) -> bytes:
    """A DICOM JSON payload: an array holding the one dataset."""
    return orjson.dumps([dataset.to_json_dict() if isinstance(dataset, Dataset) else dataset])


def state_change(state: str, transaction_uid: str | None = None) -> bytes:
    ds = Dataset()
    ds.ProcedureStepState = state
    if transaction_uid is not None:
        ds.TransactionUID = transaction_uid
    return body(ds)


class Client:
    """A UPS-RS client on an HTTP client (TestClient or httpx), with a token."""

    def __init__(self, http: Any, auth: dict[str, str] = AS_WRITER) -> None:
        self.http = http
        self.auth = auth

    def _send(self, method: str, path: str, payload: bytes | None, content_type: str = DICOM_JSON,
              **headers: str) -> httpx.Response:
        sent = {**self.auth, **headers}
        if payload is not None:
            sent["Content-Type"] = content_type
        return self.http.request(method, f"/dicomweb{path}", content=payload, headers=sent)

    def create(self, dataset: Dataset, uid: str | None = None, **headers: str) -> httpx.Response:
        return self._send("POST", "/workitems" + (f"?{uid}" if uid else ""), body(dataset), **headers)

    def retrieve(self, uid: str, **headers: str) -> httpx.Response:
        return self._send("GET", f"/workitems/{uid}", None, **headers)

    def update(self, uid: str, dataset: Dataset, transaction_uid: str | None = None) -> httpx.Response:
        return self._send("POST", f"/workitems/{uid}" + (f"?{transaction_uid}" if transaction_uid else ""),
                          body(dataset))

    def change_state(self, uid: str, state: str, transaction_uid: str | None = None) -> httpx.Response:
        return self._send("PUT", f"/workitems/{uid}/state", state_change(state, transaction_uid))

    def cancel(self, uid: str, dataset: Dataset | None = None) -> httpx.Response:
        return self._send("POST", f"/workitems/{uid}/cancelrequest", body(dataset) if dataset is not None else None)

    def workitem(self, uid: str) -> Dataset:
        """The workitem as Retrieve gives it, read by pydicom (which checks it is DICOM JSON)."""
        answer = self.retrieve(uid)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == DICOM_JSON
        [only] = answer.json()
        return Dataset.from_json(only)


def refused(answer: httpx.Response, status: int, warning: str = "", dimse: str = "") -> dict[str, Any]:
    """Check a refusal: its status, its Warning (``299 <service>: <text>``, containing ``warning``), its
    reason in the body; returns the body."""
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert answer.headers["warning"].startswith("299 "), answer.headers
    assert warning in answer.headers["warning"], answer.headers["warning"]
    found: dict[str, Any] = answer.json()
    assert found["detail"]
    if dimse:
        assert found["dimse_status"] == dimse
    return found


def warned(answer: httpx.Response, status: int, warning: str) -> None:
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert answer.headers["warning"].endswith(f": {warning}")


@pytest.fixture
def app_client(engine: Engine, tmp_path: Path) -> Iterator[TestClient]:
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line(PERFORMER, "write", "PERFORMER") + "\n")
    settings = load_settings(database_url=engine.url.render_as_string(hide_password=False), redis_url="",
                             api_tokens=f"{READ}:read,{WRITE}:write", api_tokens_file=str(tokens),
                             mappings_dir=ROOT / "mappings", dicom_peers="PERFORMER@127.0.0.1:9")
    with TestClient(create_app(settings, engine), client=("10.1.2.3", 50123)) as client:
        yield client


@pytest.fixture
def ups(app_client: TestClient) -> Client:
    return Client(app_client)


# --- Create and Retrieve ------------------------------------------------------------------------------

def test_create_then_retrieve_gives_the_workitem_as_dicom_json(ups: Client, app_client: TestClient) -> None:
    uid = str(generate_uid())
    created = ups.create(workitem(), uid)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == f"http://testserver/dicomweb/workitems/{uid}"
    assert created.headers["content-location"] == created.headers["location"]
    assert "warning" not in created.headers and created.content == b""
    found = ups.workitem(uid)
    assert found.SOPInstanceUID == uid and found.SOPClassUID == "1.2.840.10008.5.1.4.34.6.1"
    assert found.ProcedureStepState == "SCHEDULED" and found.ProcedureStepLabel == "CT HEAD"
    assert found.PatientID == "PUPS1" and str(found.PatientName) == "DOE^JANE"
    assert found.ReferencedRequestSequence[0].AccessionNumber == "AUPS1"
    assert "TransactionUID" not in found
    # the read role retrieves; any Accept that allows DICOM JSON does
    assert Client(app_client, AS_READER).retrieve(uid, Accept="application/dicom+json, */*;q=0.1").status_code == 200
    assert ups.retrieve(uid, Accept="*/*").status_code == 200
    # the board has it: a procedure with a SCHEDULED step
    [procedure] = app_client.get("/api/procedures", params={"accession": "AUPS1"}, headers=AS_READER).json()["items"]
    assert procedure["state"] == "SCHEDULED" and procedure["steps"][0]["status"] == "SCHEDULED"


def test_the_workitem_uid_comes_from_the_query_the_payload_or_the_broker(ups: Client) -> None:
    named = str(generate_uid())
    assert ups._send("POST", f"/workitems?workitem={named}", body(workitem())).status_code == 201
    assert ups.workitem(named).SOPInstanceUID == named
    in_payload = str(generate_uid())
    assert ups.create(workitem(SOPInstanceUID=in_payload)).status_code == 201
    assert ups.workitem(in_payload).ProcedureStepState == "SCHEDULED"
    made = ups.create(workitem())
    assert made.status_code == 201
    made_uid = made.headers["location"].rsplit("/", 1)[1]
    assert ups.workitem(made_uid).SOPInstanceUID == made_uid
    # the query and the payload disagree
    refused(ups.create(workitem(SOPInstanceUID=str(generate_uid())), str(generate_uid())), 400, "not the workitem UID")


def test_create_refusals(ups: Client) -> None:
    uid = str(generate_uid())
    assert ups.create(workitem(), uid).status_code == 201
    refused(ups.create(workitem(), uid), 409, "The Target Workitem already exists.", "0111")
    refused(ups.create(workitem(state="IN PROGRESS")), 400, "The provided value of UPS State was not SCHEDULED",
            "C309")
    incomplete = workitem()
    del incomplete.ProcedureStepLabel
    assert refused(ups.create(incomplete), 400, "missing: ProcedureStepLabel", "0120")["offending"] == ["00741204"]
    refused(ups.create(workitem(ScheduledProcedureStepPriority="URGENT")), 400, "ScheduledProcedureStepPriority",
            "0106")
    refused(ups.create(workitem(TransactionUID=str(generate_uid()))), 400, "Transaction UID", "0106")
    refused(ups.create(workitem(), "1.2.x"), 400, "is not a UID")
    refused(ups.create(workitem(), "1.2.840.10008.5.1.4.34.5"), 400, "global subscriptions")
    # nothing of the refused ones was made
    refused(ups.retrieve("1.2.x"), 400, "is not a UID")


@pytest.mark.parametrize(("payload", "why"), [
    (b"not json", "not JSON"),
    (b'{"00741000": {"vr": "CS", "Value": ["SCHEDULED"]}}', "array holding one dataset"),
    (b"[]", "array holding one dataset"),
    (b'[{"00741000": {"vr": "CS", "Value": ["SCHEDULED"]}}, {}]', "array holding one dataset"),
    (b'[{"ProcedureStepState": {"vr": "CS", "Value": ["SCHEDULED"]}}]', "eight hex digits"),
    (b'[{"00741000": {"Value": ["SCHEDULED"]}}]', "\\\"vr\\\""),
    (b'[{"00741000": {"vr": "CS", "Value": [5]}}]', "is a string"),
    (b'[{"00741000": {"vr": "CS", "Value": ["scheduled, or not"]}}]', "Invalid value for VR CS"),
    (b'[{"00741000": {"vr": "XX", "Value": ["SCHEDULED"]}}]', "unknown VR"),
    (b'[{"00741000": {"vr": "CS", "BulkDataURI": "http://elsewhere/1"}}]', "BulkDataURI"),
    (b'[{"00100010": {"vr": "PN", "Value": ["DOE^JANE"]}}]', "PN value is an object"),
    (b'[{"00404025": {"vr": "SQ", "Value": ["x"]}}]', "sequence item is an object"),
    (b'[{"00404025": {"vr": "SQ", "Value": [{"00080100": {"vr": "SH", "Value": ["' + b"X" * 17 + b'"]}}]}}]',
     "00404025[0].00080100"),
])
def test_a_payload_that_is_not_one_dicom_json_dataset_is_refused_with_why(ups: Client, payload: bytes,
                                                                         why: str) -> None:
    answer = ups._send("POST", "/workitems", payload)
    assert answer.status_code == 400, answer.text
    assert why in answer.text, answer.text


def test_a_wrong_media_type_is_415_and_a_wrong_accept_406(ups: Client) -> None:
    payload = body(workitem())
    for content_type in ("application/json", "text/plain", "multipart/related; type=\"application/dicom\""):
        refused(ups._send("POST", "/workitems", payload, content_type), 415, DICOM_JSON)
    assert ups._send("POST", "/workitems", payload, "application/dicom+json; charset=utf-8").status_code == 201
    uid = str(generate_uid())
    assert ups.create(workitem(), uid).status_code == 201
    refused(ups.retrieve(uid, Accept="application/dicom+xml"), 406, DICOM_JSON)
    refused(ups.retrieve(uid, Accept="application/dicom+json;q=0"), 406)
    refused(ups._send("PUT", f"/workitems/{uid}/state", state_change("IN PROGRESS", "1.2.3"), "application/json"),
            415)
    assert ups.workitem(uid).ProcedureStepState == "SCHEDULED"


def test_retrieve_of_no_such_workitem_is_404(ups: Client) -> None:
    refused(ups.retrieve(str(generate_uid())), 404, "The Target Workitem was not found.", "C307")


# --- the state table ----------------------------------------------------------------------------------

def test_state_table_over_ups_rs(ups: Client) -> None:
    """The DIMSE state table of test_ups_scp.test_state_table_of_a_claimed_workitem, over UPS-RS."""
    uid, txn = str(generate_uid()), str(generate_uid())
    assert ups.create(workitem(), uid).status_code == 201
    refused(ups.change_state(str(generate_uid()), "IN PROGRESS", txn), 404, "not found", "C307")
    refused(ups.change_state(uid, "COMPLETED"), 400, "The Transaction UID is missing.", "C301")
    refused(ups.change_state(uid, "COMPLETED", txn), 409, "inconsistent with the state", "C310")
    refused(ups.change_state(uid, "SCHEDULED"), 400, "only become SCHEDULED via N-CREATE", "C303")
    refused(ups.change_state(uid, "PAUSED", txn), 400, "is not valid", "0106")
    refused(ups._send("PUT", f"/workitems/{uid}/state", body({})), 400, "ProcedureStepState", "0120")
    refused(ups.update(uid, progress(txn, 0)), 400, "did not reference a claimed Workitem", "C301")
    refused(ups.change_state(uid, "IN PROGRESS"), 400, "The Transaction UID is missing.", "0120")
    claimed = ups.change_state(uid, "IN PROGRESS", txn)
    assert claimed.status_code == 200 and "warning" not in claimed.headers
    found = ups.workitem(uid)
    assert found.ProcedureStepState == "IN PROGRESS" and "TransactionUID" not in found
    refused(ups.change_state(uid, "IN PROGRESS", str(generate_uid())), 409, "inconsistent with the state", "C302")
    refused(ups.change_state(uid, "COMPLETED", str(generate_uid())), 400, "The Transaction UID is incorrect.",
            "C301")
    refused(ups.change_state(uid, "COMPLETED"), 400, "The Transaction UID is missing.", "C301")
    lacking = refused(ups.change_state(uid, "COMPLETED", txn), 409, "inconsistent with the state", "C304")
    assert "UnifiedProcedureStepPerformedProcedureSequence" in lacking["detail"]
    # Update: IN PROGRESS only with the claim's Transaction UID, in the query or the payload
    unlocked = progress(txn, 50)
    del unlocked.TransactionUID
    refused(ups.update(uid, unlocked), 400, "The Transaction UID is missing.", "C301")
    refused(ups.update(uid, unlocked, str(generate_uid())), 400, "did not reference a claimed Workitem", "C301")
    assert ups.update(uid, unlocked, txn).status_code == 200
    assert ups.update(uid, progress(txn, 60)).status_code == 200
    refused(ups.update(uid, progress(txn, 70), str(generate_uid())), 400, "not the one of the query")
    refused(ups.update(uid, unlocked, "1.2.x"), 400, "the Transaction UID '1.2.x' is not a UID")
    state_in_update = final_attributes(txn)
    state_in_update.ProcedureStepState = "COMPLETED"
    refused(ups.update(uid, state_in_update), 400, "N-SET cannot change the state", "0106")
    assert ups.update(uid, final_attributes(txn)).status_code == 200
    completed = ups.change_state(uid, "COMPLETED", txn)
    assert completed.status_code == 200 and "warning" not in completed.headers
    found = ups.workitem(uid)
    assert found.ProcedureStepState == "COMPLETED"
    assert found.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress == 60
    warned(ups.change_state(uid, "COMPLETED", txn), 200, "The UPS is already in the requested state of COMPLETED.")
    refused(ups.change_state(uid, "CANCELED", txn), 409, "inconsistent with the state", "C300")
    refused(ups.change_state(uid, "COMPLETED", str(generate_uid())), 400, "incorrect", "C301")
    refused(ups.update(uid, progress(txn, 80)), 400, "inconsistent with the current state of the Workitem", "C300")
    refused(ups.cancel(uid), 409, "The UPS is already COMPLETED.", "C311")
    refused(ups.update(str(generate_uid()), progress(txn, 1)), 404, "not found", "C307")


def test_a_scheduled_workitem_is_updated_without_a_transaction_uid(ups: Client) -> None:
    uid = str(generate_uid())
    assert ups.create(workitem(), uid).status_code == 201
    change = Dataset()
    change.ProcedureStepLabel = "CT HEAD WITH CONTRAST"
    updated = ups.update(uid, change)
    assert updated.status_code == 200 and updated.headers["content-location"].endswith(f"/workitems/{uid}")
    assert ups.workitem(uid).ProcedureStepLabel == "CT HEAD WITH CONTRAST"


def test_cancel_and_request_cancellation(ups: Client, app_client: TestClient, engine: Engine) -> None:
    # SCHEDULED: a cancel request cancels at once (no payload needed); asked again, a warning
    scheduled = str(generate_uid())
    assert ups.create(workitem(), scheduled).status_code == 201
    accepted = ups.cancel(scheduled)
    assert accepted.status_code == 202 and "warning" not in accepted.headers
    assert ups.workitem(scheduled).ProcedureStepState == "CANCELED"
    warned(ups.cancel(scheduled), 202, "The UPS is already in the requested state of CANCELED.")
    refused(ups.cancel(str(generate_uid())), 404, "not found", "C307")
    refused(ups._send("POST", f"/workitems/{scheduled}/cancelrequest", b"reason", "text/plain"), 415)
    # IN PROGRESS (claimed by the token labelled PERFORMER, a known peer): the performer is told, the
    # workitem stays IN PROGRESS until the performer cancels it with its Transaction UID
    performer = Client(app_client, AS_PERFORMER)
    uid, txn = str(generate_uid()), str(generate_uid())
    assert ups.create(workitem(), uid).status_code == 201
    assert performer.change_state(uid, "IN PROGRESS", txn).status_code == 200
    reason = Dataset()
    reason.ReasonForCancellation = "patient left"
    reason.ContactDisplayName = "Desk 3"
    assert ups.cancel(uid, reason).status_code == 202
    assert ups.workitem(uid).ProcedureStepState == "IN PROGRESS"
    [told] = [e.payload for e in rows(engine, OutboxEvent) if e.kind == "ups.event" and e.payload["uid"] == uid]
    assert (told["subscriber"], told["event_type"]) == ("PERFORMER", 2)
    info = Dataset.from_json(told["info"])
    assert (info.RequestingAE, info.ReasonForCancellation, info.ContactDisplayName) == (
        "token writ_", "patient left", "Desk 3")  # the label "token writ…" made AE-shaped
    assert performer.change_state(uid, "CANCELED", txn).status_code == 200
    assert ups.workitem(uid).ProcedureStepState == "CANCELED"
    ended = app_client.get("/api/procedures", params={"status": "DISCONTINUED"}, headers=AS_READER).json()
    [procedure] = ended["items"]
    assert procedure["steps"][0]["status"] == "DISCONTINUED"


def test_an_hl7_order_is_a_workitem_over_ups_rs(ups: Client, engine: Engine, mappings: MappingSet) -> None:
    """The RIS's order (HL7 over the real intake) is served as a workitem and claimed and completed over
    UPS-RS; the procedure follows."""
    order = schedule(engine, mappings)
    uid, txn = derived_ups_uid(order.study_instance_uid, order.sps_id), str(generate_uid())
    found = ups.workitem(uid)
    assert found.ProcedureStepState == "SCHEDULED"
    assert found.ReferencedRequestSequence[0].AccessionNumber == order.accession_number
    assert ups.change_state(uid, "IN PROGRESS", txn).status_code == 200
    assert step_status(engine, order.step_pk) == "STARTED"
    assert ups.update(uid, final_attributes(txn)).status_code == 200
    assert ups.change_state(uid, "COMPLETED", txn).status_code == 200
    assert step_status(engine, order.step_pk) == "COMPLETED"
    assert procedure_state(engine, order.procedure_pk) == "COMPLETED"


# --- tokens and the audit trail -------------------------------------------------------------------------

def test_tokens_read_for_retrieve_write_for_changes(app_client: TestClient) -> None:
    uid = str(generate_uid())
    assert Client(app_client).create(workitem(), uid).status_code == 201
    reader, nobody = Client(app_client, AS_READER), Client(app_client, {})
    assert reader.retrieve(uid).status_code == 200
    assert nobody.retrieve(uid).status_code == 401
    for answer in (reader.create(workitem()), reader.update(uid, progress("1.2.3", 1)),
                   reader.change_state(uid, "IN PROGRESS", "1.2.3"), reader.cancel(uid)):
        assert answer.status_code == 403 and "write" in answer.json()["detail"]
    for answer in (nobody.create(workitem()), nobody.change_state(uid, "IN PROGRESS", "1.2.3"), nobody.cancel(uid)):
        assert answer.status_code == 401
    assert Client(app_client).workitem(uid).ProcedureStepState == "SCHEDULED"


def test_changes_are_recorded_as_the_token_at_the_client_address(ups: Client, app_client: TestClient,
                                                                  engine: Engine) -> None:
    uid, txn = str(generate_uid()), str(generate_uid())
    dataset = workitem()
    study = dataset.ReferencedRequestSequence[0].StudyInstanceUID
    assert ups.create(dataset, uid).status_code == 201
    assert ups.change_state(uid, "COMPLETED", txn).status_code == 409  # refused: no record
    performer = Client(app_client, AS_PERFORMER)
    assert performer.change_state(uid, "IN PROGRESS", txn).status_code == 200
    assert performer.update(uid, progress(txn, 10)).status_code == 200
    assert performer.change_state(uid, "CANCELED", txn).status_code == 200
    patient = ("PUPS1^^^CITYMED",)

    def procedure_record(action: str, user: str, description: str) -> Rec:
        return Rec("Procedure Record", action, user, "10.1.2.3", patients=patient, orders=("AUPS1",),
                   studies=(study,), procedures=(uid,), description=description)

    writer = "token writ\u2026"
    assert [r for r in recorded(engine) if r.event in ("Order Record", "Procedure Record")] == [
        Rec("Order Record", "C", writer, "10.1.2.3", patient, ("AUPS1",), (study,)),
        procedure_record("C", writer, "UPS SCHEDULED"),
        procedure_record("U", "PERFORMER", "UPS SCHEDULED -> IN PROGRESS"),
        procedure_record("U", "PERFORMER", "UPS attributes updated (1)"),
        procedure_record("U", "PERFORMER", "UPS IN PROGRESS -> CANCELED")]
    [step] = rows(engine, ScheduledStep, ups_instance_uid=uid)
    assert step.sps_status == "DISCONTINUED"


# --- one workitem, three faces: broker run, UPS-RS over httpx, DIMSE over pynetdicom ----------------------

@pytest.fixture
def running(database_url: str, tmp_path: Path) -> Iterator[tuple[httpx.Client, int]]:
    """``broker run`` on a fresh database with its HTTP and DICOM ports: an httpx client on the HTTP
    port (as an outside UPS-RS client) and the DICOM port."""
    dicom_port, http_port = free_port(), free_port()
    env = env_for(database_url, BROKER_HL7_PORT=str(free_port()), BROKER_DICOM_PORT=str(dicom_port),
                  BROKER_DICOM_HOST="127.0.0.1", BROKER_HTTP_PORT=str(http_port), BROKER_HTTP_HOST="127.0.0.1",
                  BROKER_REDIS_URL="", BROKER_API_TOKENS=f"{READ}:read,{WRITE}:write,{AUDITOR}:audit")
    assert run_cli("db", "upgrade", env=env).returncode == 0
    log = tmp_path / "broker.log"
    with log.open("w") as sink:
        process = subprocess.Popen([*BROKER, "run"], cwd=ROOT, env=env, stderr=sink, text=True)
    try:
        wait_for_port(dicom_port, process)
        wait_for_port(http_port, process)
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as http:
            yield http, dicom_port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def mwl(assoc: Any, accession: str, status: str = "") -> list[str]:
    """The SPS statuses the Modality Worklist answers for ``accession`` (asking for ``status``: the
    worklist hides started and ended steps unless asked for their status)."""
    query = Dataset()
    query.AccessionNumber = accession
    sps = Dataset()
    sps.ScheduledProcedureStepStatus = status
    sps.ScheduledStationAETitle = ""
    query.ScheduledProcedureStepSequence = [sps]
    return [str(item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus)
            for item in find(assoc, query, ModalityWorklistInformationFind)]


def ups_find(assoc: Any, uid: str) -> list[str]:
    """The Procedure Step States a UPS C-FIND answers for the workitem ``uid``."""
    query = Dataset()
    query.SOPInstanceUID = uid
    query.ProcedureStepState = ""
    return [str(found.ProcedureStepState) for found in find(assoc, query)]


def board(http: httpx.Client, accession: str) -> tuple[str, str]:
    """The procedure state and step status the board's data (``/api/procedures``) shows."""
    [procedure] = http.get("/api/procedures", params={"accession": accession}, headers=AS_READER).json()["items"]
    return procedure["state"], procedure["steps"][0]["status"]


def test_a_workitem_made_over_ups_rs_is_worked_over_dimse_and_ended_over_ups_rs(
        running: tuple[httpx.Client, int]) -> None:
    http, dicom_port = running
    ups = Client(http)
    uid, txn = str(generate_uid()), str(generate_uid())
    dataset = workitem(ReferencedRequestSequence=[])
    request = Dataset()
    request.AccessionNumber = "AWEB1"
    request.RequestedProcedureID = "RWEB1"
    request.StudyInstanceUID = str(generate_uid())
    dataset.ReferencedRequestSequence = [request]
    assert ups.create(dataset, uid).status_code == 201
    scu = ups_scu(dicom_port, "CT01")
    try:
        # created over UPS-RS: a UPS to DIMSE (C-FIND, N-GET), a worklist item, a row of the board
        assert ups_find(scu, uid) == ["SCHEDULED"]
        status, got = get(scu, uid)
        assert status == 0 and got is not None and got.ProcedureStepState == "SCHEDULED"
        assert mwl(scu, "AWEB1") == ["SCHEDULED"]
        assert board(http, "AWEB1") == ("SCHEDULED", "SCHEDULED")
        # claimed over DIMSE: UPS-RS shows it IN PROGRESS (without the claim's Transaction UID)
        assert change_state(scu, uid, "IN PROGRESS", txn) == 0
        found = ups.workitem(uid)
        assert found.ProcedureStepState == "IN PROGRESS" and "TransactionUID" not in found
        assert mwl(scu, "AWEB1") == [] and mwl(scu, "AWEB1", "STARTED") == ["STARTED"]
        assert board(http, "AWEB1") == ("STARTED", "STARTED")
        # another client over UPS-RS without the Transaction UID cannot end it
        assert ups.change_state(uid, "COMPLETED").status_code == 400
        # the performer completes it over UPS-RS with its Transaction UID
        assert ups.update(uid, final_attributes(txn)).status_code == 200
        assert ups.change_state(uid, "COMPLETED", txn).status_code == 200
        assert get(scu, uid)[1].ProcedureStepState == "COMPLETED"  # type: ignore[union-attr]
        assert ups_find(scu, uid) == ["COMPLETED"]
        assert mwl(scu, "AWEB1", "COMPLETED") == ["COMPLETED"]
        assert board(http, "AWEB1") == ("COMPLETED", "COMPLETED")
        # over DIMSE the UPS is final now too
        assert change_state(scu, uid, "CANCELED", txn) == 0xC300
    finally:
        scu.release()

    # the audit trail: the changes over UPS-RS as the token at its address, over DIMSE as the AE; each
    # Retrieve a Query record naming the patient
    def trail(**query: str) -> list[tuple[str, str, str, str]]:
        found = http.get("/api/audit", params={"patient": "PUPS1", **query},
                         headers={"Authorization": f"Bearer {AUDITOR}"}).json()
        return [(r["event"], r["action"], r["user_id"], r["host"]) for r in reversed(found)]

    writer = ("token writ\u2026", "127.0.0.1")
    assert trail(event="procedure") == [("procedure", "C", *writer), ("procedure", "U", "CT01", "127.0.0.1"),
                                        ("procedure", "U", *writer), ("procedure", "U", *writer)]
    # (the board's reads with the read token are Query records too)
    wait_until(lambda: trail(event="query", user=writer[0]), what="the Query record of the retrieval")
    assert set(trail(event="query", user=writer[0])) == {("query", "E", *writer)}


def test_a_workitem_made_over_dimse_is_worked_over_ups_rs_and_ended_over_dimse(
        running: tuple[httpx.Client, int]) -> None:
    http, dicom_port = running
    ups = Client(http)
    uid, txn = str(generate_uid()), str(generate_uid())
    scu = ups_scu(dicom_port, "CT01")
    try:
        assert create(scu, workitem(), uid) == 0
        assert ups.workitem(uid).ProcedureStepState == "SCHEDULED"
        # claimed over UPS-RS: DIMSE and the worklist see it started; a DIMSE claim now conflicts
        assert ups.change_state(uid, "IN PROGRESS", txn).status_code == 200
        assert get(scu, uid)[1].ProcedureStepState == "IN PROGRESS"  # type: ignore[union-attr]
        assert change_state(scu, uid, "IN PROGRESS", str(generate_uid())) == 0xC302
        assert mwl(scu, "AUPS1", "STARTED") == ["STARTED"]
        assert board(http, "AUPS1") == ("STARTED", "STARTED")
        # progress over UPS-RS, read over DIMSE
        assert ups.update(uid, progress(txn, 40)).status_code == 200
        got = get(scu, uid)[1]
        assert got is not None and got.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress == 40
        # ended over DIMSE with the Transaction UID the UPS-RS client made
        ds = final_attributes(txn)
        status, _ = scu.send_n_set(ds, "1.2.840.10008.5.1.4.34.6.1", uid)
        assert status.Status == 0
        assert int(action(scu, uid, CHANGE_STATE, ProcedureStepState="COMPLETED", TransactionUID=txn).Status) == 0
        assert ups.workitem(uid).ProcedureStepState == "COMPLETED"
        assert board(http, "AUPS1") == ("COMPLETED", "COMPLETED")
        warned(ups.change_state(uid, "COMPLETED", txn), 200, "The UPS is already in the requested state of COMPLETED.")
        # a SCHEDULED one canceled over UPS-RS is canceled for DIMSE and leaves the worklist
        other = workitem(ReferencedRequestSequence=[])
        request = Dataset()
        request.AccessionNumber = "AUPS2"
        request.StudyInstanceUID = str(generate_uid())
        other.ReferencedRequestSequence = [request]
        second = str(generate_uid())
        assert create(scu, other, second) == 0
        assert mwl(scu, "AUPS2") == ["SCHEDULED"]
        assert ups.cancel(second).status_code == 202
        assert get(scu, second)[1].ProcedureStepState == "CANCELED"  # type: ignore[union-attr]
        assert mwl(scu, "AUPS2") == [] and mwl(scu, "AUPS2", "CANCELED") == ["CANCELED"]
        assert board(http, "AUPS2") == ("CANCELED", "CANCELED")
    finally:
        scu.release()


def test_stations_claiming_one_workitem_at_once_over_ups_rs_one_wins(running: tuple[httpx.Client, int]) -> None:
    """Eight clients claim the same workitem at the same moment: one claim wins, the others are told the
    workitem is IN PROGRESS already (C302, 409), and the step is started once."""
    http, _ = running
    ups = Client(http)
    uid = str(generate_uid())
    assert ups.create(workitem(), uid).status_code == 201
    barrier = threading.Barrier(8)

    def claim(_: int) -> int:
        with httpx.Client(base_url=str(http.base_url), timeout=30) as own:
            barrier.wait()
            return Client(own).change_state(uid, "IN PROGRESS", str(generate_uid())).status_code

    with ThreadPoolExecutor(8) as pool:
        answers = sorted(pool.map(claim, range(8)))
    assert answers == [200] + [409] * 7
    assert board(http, "AUPS1") == ("STARTED", "STARTED")
    [procedure] = http.get("/api/procedures", params={"accession": "AUPS1"}, headers=AS_READER).json()["items"]
    detail = http.get(f"/api/procedures/{procedure['id']}", headers=AS_READER).json()
    assert [entry["to"] for entry in detail["timeline"]].count("STARTED") == 1
