"""Patient data and library warnings in the logs, from outside: ``broker run`` as a process with JSON logs on stderr.

Item 11: with ``BROKER_LOG_PATIENT_DATA=false`` (the default) no value a message carried reaches the log,
neither in a problem text (a birth date the HL7 intake refuses, a date range the worklist refuses) nor in
an exception's message (an internal error whose exception names the patient); with ``true`` they do.
Item 12: a warning pydicom gives while it reads a request's data set is one structured event naming the
calling AE and peer, not a raw ``UserWarning`` (nor a second, plain ``pydicom`` logging line) on stderr.
(The issue's example, an identifier encoded Explicit VR on an Implicit VR context, no longer reaches
pydicom: the acceptor refuses it as malformed first; an over-long value is what pydicom still warns about.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from broker.dicom import dimse
from broker.hl7.mllp_client import MLLPClient
from tests.conftest import ROOT, sample
from tests.integration.test_cli import env_for, free_port, run_cli, wait_for_port
from tests.integration.test_dicom_odd_input import (
    MWL_EXPLICIT,
    element,
    identifier,
    open_association,
    read_response,
    send_request,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
BIRTH_DATE = "1971XXXX"
NAME = "GEHEIM^HILDEGARD"
CRASH_NAME = "KAPUTT^KLAUS"
DATE_RANGE = "19710231-19710301"
LONG_ACCESSION = element(0x00080050, "SH", b"A" * 40, implicit=False)
# The broker, with one failure planted: indexing a worklist item whose patient is named KAPUTT raises an
# exception that names the patient (as a bug might), so the intake answers AE 207 and logs the traceback.
PLANTED = """
import broker.domain.worklist_item as item
_norm = item._norm
def _failing(pn):
    if "KAPUTT" in pn:
        raise RuntimeError("cannot index patient " + pn)
    return _norm(pn)
item._norm = _failing
from broker.cli import main
raise SystemExit(main())
"""


def orm(control_id: str, name: str, birth_date: str, number: str) -> bytes:
    return (sample("orm_o01_new.hl7").replace(b"RIS000101", control_id.encode())
            .replace("MÜLLER^ERIKA^A^^FRAU".encode("latin-1"), name.encode())
            .replace(b"19620412", birth_date.encode()).replace(b"77001", number.encode()))


def run_broker(database_url: str, patient_data: bool) -> tuple[str, list[dict[str, Any]]]:
    """Start ``broker run``, send everything, stop it; its stderr and the JSON events in it."""
    hl7_port, dicom_port = free_port(), free_port()
    env = env_for(database_url, BROKER_HL7_PORT=str(hl7_port), BROKER_DICOM_PORT=str(dicom_port),
                  BROKER_HTTP_PORT="0", BROKER_LOG_PATIENT_DATA=str(patient_data).lower())
    assert run_cli("db", "upgrade", env=env).returncode == 0
    process = subprocess.Popen([sys.executable, "-c", PLANTED, "run"], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for_port(hl7_port, process)
        wait_for_port(dicom_port, process)
        with MLLPClient("127.0.0.1", hl7_port) as client:
            run = "9" if patient_data else "8"  # the two runs of a test share a database: no duplicates
            assert b"MSA|AE" in client.send(orm(f"PRIV1{run}", NAME, BIRTH_DATE, f"88{run}1"))
            assert b"MSA|AE" in client.send(orm(f"PRIV2{run}", CRASH_NAME, "19500101", f"88{run}2"))
        ae = AE(ae_title="PRIVSCU")
        ae.add_requested_context(ModalityWorklistInformationFind)
        assoc = ae.associate("127.0.0.1", dicom_port, ae_title="BROKER")
        assert assoc.is_established
        query = Dataset()
        query.PatientName = ""
        step = Dataset()
        step.ScheduledProcedureStepStartDate = DATE_RANGE
        query.ScheduledProcedureStepSequence = [step]
        statuses = [int(status.Status) for status, _ in assoc.send_c_find(query, ModalityWorklistInformationFind)
                    if status is not None and "Status" in status]
        assoc.release()
        assert statuses and statuses[-1] not in (0x0000, 0xFF00), statuses
        # pydicom warns while it reads an identifier (an Accession Number longer than SH allows)
        with open_association(dicom_port) as sock:
            find = {"AffectedSOPClassUID": ModalityWorklistInformationFind, "CommandField": dimse.C_FIND_RQ,
                    "Priority": 0}
            send_request(sock, MWL_EXPLICIT, find, identifier(implicit=False) + LONG_ACCESSION)
            while int(read_response(sock)[0].Status) == 0xFF00:
                pass
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    events = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return stderr, events


def test_message_values_stay_out_of_the_log_unless_patient_data_is_on(database_url: str) -> None:
    stderr, events = run_broker(database_url, patient_data=False)
    names = {e["event"] for e in events}
    assert {"hl7.message", "hl7.internal_error", "mwl.invalid_query"} <= names, sorted(names)
    for secret in (BIRTH_DATE, "GEHEIM", "HILDEGARD", "KAPUTT", "KLAUS", "19710231", "19710301"):
        assert secret not in stderr, (secret, [line for line in stderr.splitlines() if secret in line])
    # the field and the problem are still there
    refused = next(e for e in events if e["event"] == "hl7.message" and e["control_id"] == "PRIV18")
    assert "PID-7" in refused["error"]
    crashed = next(e for e in events if e["event"] == "hl7.internal_error")
    assert "RuntimeError" in crashed["exception"] and "_failing" in crashed["exception"]
    invalid = next(e for e in events if e["event"] == "mwl.invalid_query")
    assert "ScheduledProcedureStepStartDate" in invalid["error"] and invalid["calling_ae"] == "PRIVSCU"

    stderr, _ = run_broker(database_url, patient_data=True)
    for secret in (BIRTH_DATE, "KAPUTT^KLAUS", "19710231"):
        assert secret in stderr, secret


def test_a_pydicom_warning_is_one_structured_event_of_its_association(database_url: str) -> None:
    stderr, events = run_broker(database_url, patient_data=False)
    assert "UserWarning" not in stderr and "warnings.warn" not in stderr
    non_json = [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert not non_json, non_json
    warned = [e for e in events if "exceeds the maximum length of 16 allowed for VR SH" in json.dumps(e)]
    assert len(warned) == 1, warned
    assert warned[0]["calling_ae"] == "ODDSCU" and warned[0]["peer"] == "127.0.0.1"
    assert warned[0]["level"] == "warning"
