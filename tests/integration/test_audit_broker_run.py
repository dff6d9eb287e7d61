"""A real ``broker run`` delivers its audit trail to a real rsyslog over TLS: the start, an HL7 order, a
worklist C-FIND and the stop arrive, each a valid DICOM audit message."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest
from lxml import etree

from broker.hl7.mllp_client import MLLPClient
from tests.conftest import sample
from tests.hl7_support import msa_code
from tests.integration.audit_rsyslog import Rsyslog, available
from tests.integration.test_cli import broker_run, env_for, free_port
from tests.tls_support import Pki

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not available(), reason="rsyslogd not installed")]
SCHEMA = etree.RelaxNG(etree.fromstring(
    resources.files("broker.audit").joinpath("dicom-audit-message.rng").read_bytes()))


def test_broker_run_delivers_start_order_query_and_stop(tmp_path: Path, pki: Pki) -> None:
    rsyslog = Rsyslog(tmp_path, pki)
    rsyslog.start()
    try:
        hl7_port, dicom_port = free_port(), free_port()
        env = env_for(f"sqlite:///{tmp_path / 'broker.db'}", BROKER_HL7_PORT=str(hl7_port),
                      BROKER_DICOM_HOST="127.0.0.1", BROKER_DICOM_PORT=str(dicom_port), BROKER_HTTP_PORT="0",
                      BROKER_AUDIT_REPOSITORY=f"tls://localhost:{rsyslog.tcp_port}", BROKER_AUDIT_RETRY_MAX="0.5",
                      BROKER_AUDIT_SOURCE_ID="BROKER@test", BROKER_AUDIT_ENTERPRISE_SITE_ID="HOSP",
                      **pki.broker_env())
        with (tmp_path / "broker.log").open("w") as log, broker_run(env, hl7_port, dicom_port, stderr=log):
            with MLLPClient("127.0.0.1", hl7_port) as client:
                assert msa_code(client.send(sample("orm_o01_new.hl7"))) == "AA"
            result = subprocess.run([shutil.which("findscu") or "findscu", "-W", "-aet", "FINDSCU", "-aec", "BROKER",
                                     "-to", "30", "-k", "PatientID", "-k", "AccessionNumber", "127.0.0.1",
                                     str(dicom_port)], capture_output=True, text=True, timeout=60,
                                    env={**os.environ, "LANG": "C"})
            assert result.returncode == 0, result.stderr
        received = rsyslog.wait_for(4)
        documents = [etree.fromstring(text.encode()) for text in received]
        for document in documents:
            assert SCHEMA.validate(document), SCHEMA.error_log
            assert document.find("AuditSourceIdentification").get("AuditSourceID") == "BROKER@test"
        kinds = Counter((d.find("EventIdentification/EventID").get("csd-code"),
                         (d.find("EventIdentification/EventTypeCode") is not None
                          and d.find("EventIdentification/EventTypeCode").get("csd-code")) or "")
                        for d in documents)
        assert kinds[("110100", "110120")] == 1  # Application Start
        assert kinds[("110100", "110121")] == 1  # Application Stop, delivered at the stop
        assert sum(n for (event, _), n in kinds.items() if event == "110109") >= 1  # the order
        queries = [d for d in documents if d.find("EventIdentification/EventID").get("csd-code") == "110112"]
        assert any(q.find("ActiveParticipant").get("UserID") == "FINDSCU" for q in queries)
        first, last = documents[0], documents[-1]
        assert first.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"
        assert last.find("EventIdentification/EventTypeCode").get("csd-code") == "110121"
    finally:
        rsyslog.stop()


def _order(n: int) -> bytes:
    return sample("orm_o01_new.hl7").replace(b"77001", str(78000 + n).encode()).replace(
        b"RIS000101", f"RIS9{n:05d}".encode())


def _order_accessions(messages: list[str]) -> list[str]:
    found = []
    for text in messages:
        document = etree.fromstring(text.encode())
        assert SCHEMA.validate(document), SCHEMA.error_log
        if document.find("EventIdentification/EventID").get("csd-code") == "110109":
            found.extend(a.get("Number") for a in document.iter("Accession"))
    return list(dict.fromkeys(found))  # at least once: a record may come twice


def _arrived(rsyslog: Rsyslog, accessions: list[str], seconds: float = 15) -> bool:
    """Whether the Order Records of exactly ``accessions``, in this order, arrive within ``seconds``."""
    deadline = time.monotonic() + seconds
    while _order_accessions(rsyslog.messages()) != accessions and time.monotonic() < deadline:
        time.sleep(0.1)
    return _order_accessions(rsyslog.messages()) == accessions


def test_records_made_while_the_repository_is_down_arrive_in_order(tmp_path: Path, pki: Pki) -> None:
    rsyslog = Rsyslog(tmp_path, pki)
    rsyslog.start()
    try:
        hl7_port, dicom_port = free_port(), free_port()
        env = env_for(f"sqlite:///{tmp_path / 'broker.db'}", BROKER_HL7_PORT=str(hl7_port),
                      BROKER_DICOM_HOST="127.0.0.1", BROKER_DICOM_PORT=str(dicom_port), BROKER_HTTP_PORT="0",
                      BROKER_AUDIT_REPOSITORY=f"tls://localhost:{rsyslog.tcp_port}", BROKER_AUDIT_RETRY_MAX="0.5",
                      **pki.broker_env())
        with ((tmp_path / "broker.log").open("w") as log, broker_run(env, hl7_port, dicom_port, stderr=log),
              MLLPClient("127.0.0.1", hl7_port) as client):
            assert msa_code(client.send(_order(0))) == "AA"
            assert _arrived(rsyslog, ["ACC78000"])
            rsyslog.stop()
            for n in range(1, 11):
                assert msa_code(client.send(_order(n))) == "AA"
            time.sleep(2.0)  # several failed attempts, backing off up to 0.5 s
            rsyslog.start()
            expected = [f"ACC{78000 + n}" for n in range(11)]
            assert _arrived(rsyslog, expected), _order_accessions(rsyslog.messages())
    finally:
        rsyslog.stop()
