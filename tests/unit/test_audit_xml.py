"""Every event constructor's audit message validates against the schema of PS3.15 A.5.1."""

from __future__ import annotations

from datetime import datetime
from importlib import resources

import pytest
from lxml import etree

from broker.audit import events
from broker.audit.events import AuditEvent, Participant, Source
from broker.audit.xml import escape, render

SCHEMA = etree.RelaxNG(etree.fromstring(
    resources.files("broker.audit").joinpath("dicom-audit-message.rng").read_bytes()))
BROKER = Participant("BROKER", "broker-host", role="destination", alternative_user_id="4242")
HL7 = Source("RIS^HOSP", "10.1.2.3", "hl7")
MOD = Source("CT01", "10.1.2.4", "dicom")

EVENTS: dict[str, AuditEvent] = {
    "start": events.application_activity(True, Participant("BROKER", "h", role="application", alternative_user_id="1")),
    "stop": events.application_activity(False, Participant("BROKER", "h", role="application")),
    "order": events.order_record("C", HL7, BROKER, patient_id="P1^^^HOSP", accession_number="ACC1",
                                 study_uid="1.2.3.4"),
    "order without study": events.order_record("D", HL7, BROKER, patient_id="P1", accession_number="ACC1"),
    "procedure": events.procedure_record("U", MOD, BROKER, patient_id="P1", study_uid="1.2.3", accession_number="A",
                                         step_id="SPS1", description="MPPS IN PROGRESS"),
    "patient merge": events.patient_record("U", HL7, BROKER, patient_id="P1", merged_patient_id="P0"),
    "mwl query": events.query(MOD, BROKER, what="1.2.840.10008.5.1.4.31", query_bytes=b"\x00\x01<&>\xff",
                              patient_ids=("P1", "P2"), details=(("TransferSyntax", "1.2.840.10008.1.2"),)),
    "rest read": events.query(Source("token board", "::1", "http"), BROKER, what="/api/procedures",
                              query_bytes=b"patient_id=P1"),
    "alert": events.security_alert(Source("unknown", "10.9.9.9", "dicom"), BROKER, alert=events.NODE_AUTHENTICATION,
                                   reason='handshake failed: "unknown ca" <\x01>', resource="dicom-tls:2762"),
    "restricted": events.security_alert(Source("token x", "10.9.9.9", "http"), BROKER,
                                        alert=events.USE_OF_RESTRICTED_FUNCTION, reason="403", resource="/api/audit"),
}


@pytest.mark.parametrize("name", list(EVENTS))
def test_each_event_validates_against_the_dicom_audit_message_schema(name: str) -> None:
    xml = render(EVENTS[name], source_id="BROKER@host", site_id="HOSP", when=datetime(2026, 12, 4, 10, 0, 0, 123000))
    document = etree.fromstring(xml.encode())
    assert SCHEMA.validate(document), SCHEMA.error_log
    assert document.find("EventIdentification/EventID").get("csd-code") == EVENTS[name].event_id[0]
    assert document.find("AuditSourceIdentification").get("AuditSourceID") == "BROKER@host"


def test_the_message_carries_the_codes_of_the_standard() -> None:
    doc = etree.fromstring(render(EVENTS["mwl query"], source_id="S", site_id="", when=datetime(2026, 1, 1)).encode())
    requestor, broker = doc.findall("ActiveParticipant")
    assert (requestor.get("UserID"), requestor.get("UserIsRequestor"), requestor.get("NetworkAccessPointTypeCode")) \
        == ("CT01", "true", "2")
    assert requestor.find("RoleIDCode").get("csd-code") == "110153"
    assert broker.find("RoleIDCode").get("csd-code") == "110152"
    assert broker.get("NetworkAccessPointTypeCode") == "1"
    query, patient, _ = doc.findall("ParticipantObjectIdentification")
    assert (query.get("ParticipantObjectTypeCode"), query.get("ParticipantObjectTypeCodeRole")) == ("2", "24")
    assert query.find("ParticipantObjectIDTypeCode").get("csd-code") == "110181"
    assert query.findtext("ParticipantObjectQuery") == "AAE8Jj7/"
    assert query.find("ParticipantObjectDetail").get("type") == "TransferSyntax"
    assert (patient.get("ParticipantObjectTypeCode"), patient.get("ParticipantObjectTypeCodeRole"),
            patient.find("ParticipantObjectIDTypeCode").get("originalText")) == ("1", "1", "Patient Number")
    order = etree.fromstring(render(EVENTS["order"], source_id="S", site_id="", when=datetime(2026, 1, 1)).encode())
    study = order.findall("ParticipantObjectIdentification")[1]
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    assert study.find("ParticipantObjectDescription/Accession").get("Number") == "ACC1"


def test_event_date_time_says_its_time_zone() -> None:
    xml = render(EVENTS["start"], source_id="S", site_id="", when=datetime(2026, 12, 4, 10, 0))
    stamp = etree.fromstring(xml.encode()).find("EventIdentification").get("EventDateTime")
    assert datetime.fromisoformat(stamp).utcoffset() is not None


def test_escape_keeps_the_message_well_formed() -> None:
    assert escape('a<b>&"c"') == "a&lt;b&gt;&amp;&quot;c&quot;"
    assert escape("x\x00y\ud800") == "x\ufffdy\ufffd"
