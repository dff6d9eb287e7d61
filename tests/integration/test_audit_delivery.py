"""The audit outbox delivered to a real rsyslog over TLS and UDP: every record arrives, valid, in order,
also when the repository was down for a while."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import Engine, func, select

from broker.audit import events
from broker.audit.events import Source
from broker.audit.shipper import AuditShipper, purge_expired
from broker.audit.trail import broker_participant, record
from broker.config import Settings
from broker.store.tables import AuditRecord, table_of
from tests.integration.audit_rsyslog import Rsyslog, available
from tests.tls_support import Pki

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not available(), reason="rsyslogd not installed")]
SCHEMA = etree.RelaxNG(etree.fromstring(
    resources.files("broker.audit").joinpath("dicom-audit-message.rng").read_bytes()))
RECORDS = table_of(AuditRecord)
BROKER = broker_participant("BROKER")


@pytest.fixture
def rsyslog(tmp_path: Path, pki: Pki) -> Iterator[Rsyslog]:
    server = Rsyslog(tmp_path, pki)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _settings(pki: Pki, repository: str, database_url: str) -> Settings:
    return Settings(database_url=database_url, audit_repository=repository, audit_retry_max=0.5,
                    audit_source_id="BROKER@test", tls_certificate=pki.client_cert,
                    tls_private_key=pki.client_key, tls_ca_bundle=pki.ca)


def _order(n: int) -> events.AuditEvent:
    return events.order_record("C", Source("RIS^HOSP", "10.0.0.1", "hl7"), BROKER, patient_id=f"P{n}",
                               accession_number=f"ACC{n}", study_uid=f"1.2.3.{n}")


def _accessions(messages: list[str]) -> list[str]:
    out = []
    for text in messages:
        document = etree.fromstring(text.encode())
        assert SCHEMA.validate(document), SCHEMA.error_log
        out.append(document.find(".//Accession").get("Number"))
    return out


def _undelivered(engine: Engine) -> int:
    with engine.connect() as db:
        return int(db.execute(select(func.count()).select_from(RECORDS)
                              .where(RECORDS.c.delivered_at.is_(None))).scalar_one())


def test_tls_delivery_survives_a_repository_outage_in_order(engine: Engine, database_url: str, pki: Pki,
                                                           rsyslog: Rsyslog) -> None:
    shipper = AuditShipper(_settings(pki, f"tls://localhost:{rsyslog.tcp_port}", database_url), engine)
    shipper.start()
    try:
        for n in range(5):
            with engine.begin() as db:
                record(db, _order(n), datetime.now())
        assert _accessions(rsyslog.wait_for(5)) == [f"ACC{n}" for n in range(5)]
        rsyslog.stop()
        for n in range(5, 25):  # recorded while the repository is down
            with engine.begin() as db:
                record(db, _order(n), datetime.now())
        time.sleep(2.0)
        assert _undelivered(engine) == 20
        rsyslog.start()
        received = rsyslog.wait_for(25)
    finally:
        shipper.stop()
    accessions = _accessions(received)
    assert list(dict.fromkeys(accessions)) == [f"ACC{n}" for n in range(25)]  # none lost, in order
    assert _undelivered(engine) == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_udp_delivery(engine: Engine, database_url: str, pki: Pki, rsyslog: Rsyslog) -> None:
    shipper = AuditShipper(_settings(pki, f"udp://127.0.0.1:{rsyslog.udp_port}", database_url), engine)
    for n in range(3):
        with engine.begin() as db:
            record(db, _order(n), datetime.now())
    assert shipper.ship_once() == 3
    shipper.stop()
    assert _accessions(rsyslog.wait_for(3)) == ["ACC0", "ACC1", "ACC2"]


def test_retention_deletes_old_records_delivered_or_not(engine: Engine) -> None:
    now = datetime(2026, 12, 4, 12, 0)
    with engine.begin() as db:
        record(db, _order(1), now - timedelta(days=31))
        record(db, _order(2), now - timedelta(days=29))
    assert purge_expired(engine, 30, now) == 1
    with engine.connect() as db:
        left = db.execute(select(RECORDS.c.recorded_at)).scalars().all()
    assert left == [now - timedelta(days=29)]
