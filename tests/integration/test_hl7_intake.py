"""HL7 intake behaviour over real TCP on SQLite and PostgreSQL: order controls, ADT, refusals."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from broker.hl7.mllp_client import MLLPClient
from broker.store.tables import InboundMessage, Patient, StepTransition
from tests.conftest import sample
from tests.hl7_support import ack_of, err_fields, item_value, msa_code, steps, with_control_id

pytestmark = pytest.mark.integration

NEW = sample("orm_o01_new.hl7")


def send(port: int, *messages: bytes) -> list[bytes]:
    with MLLPClient("127.0.0.1", port) as client:
        return [client.send(m) for m in messages]


def order_control(control: str, status: str, control_id: str) -> bytes:
    """The sample order with another ORC-1/ORC-5 and MSH-10."""
    raw = with_control_id(NEW, control_id)
    return raw.replace(b"ORC|NW|", f"ORC|{control}|".encode()).replace(
        b"|FO-77001^RADRIS||SC||", f"|FO-77001^RADRIS||{status}||".encode())


@pytest.mark.parametrize(("control", "status", "expected"), [
    ("SC", "IP", "STARTED"),
    ("SC", "CM", "COMPLETED"),
    ("XO", "CM", "COMPLETED"),
    ("SC", "", "SCHEDULED"),  # status only: no change
    ("DC", "CA", "DISCONTINUED"),
    ("OD", "", "DISCONTINUED"),
    ("OC", "", "CANCELED"),
])
def test_order_control_effects(listener: int, sessions: sessionmaker[Session], control: str, status: str,
                               expected: str) -> None:
    replies = send(listener, NEW, order_control(control, status, "RIS000900"))
    assert [msa_code(r) for r in replies] == ["AA", "AA"]
    [step] = steps(sessions)
    assert step.sps_status == expected


def test_cancel_after_start_leaves_the_started_step(listener: int, sessions: sessionmaker[Session]) -> None:
    send(listener, NEW, order_control("SC", "IP", "RIS000901"), order_control("CA", "CA", "RIS000902"))
    [step] = steps(sessions)
    assert step.sps_status == "STARTED"  # CA applies to steps not yet performed; DC ends a started one
    send(listener, order_control("DC", "CA", "RIS000903"))
    assert steps(sessions)[0].sps_status == "DISCONTINUED"


def test_every_transition_is_kept_with_its_cause(listener: int, sessions: sessionmaker[Session]) -> None:
    send(listener, NEW, sample("orm_o01_cancel.hl7"))
    with sessions() as session:
        rows = session.scalars(select(StepTransition).order_by(StepTransition.id)).all()
    assert [(r.from_status, r.to_status) for r in rows] == [("", "SCHEDULED"), ("SCHEDULED", "CANCELED")]
    assert rows[0].cause == "HL7 ORM^O01 RIS000101" and rows[1].cause == "HL7 ORM^O01 RIS000102"
    assert rows[1].inbound_message_fk is not None


def test_cancel_of_unknown_order_is_unknown_key(listener: int, sessions: sessionmaker[Session]) -> None:
    [reply] = send(listener, sample("orm_o01_cancel.hl7"))
    assert msa_code(reply) == "AE"
    assert [(loc, code) for loc, code, _ in err_fields(reply)] == [("ORC-2", "204")]


def test_new_order_reusing_a_step_key_is_a_duplicate_key(listener: int, sessions: sessionmaker[Session]) -> None:
    # other placer/filler numbers, same Study Instance UID (ZDS-1) and SPS ID: the step exists already
    again = with_control_id(NEW, "RIS000905").replace(b"O-77001", b"O-77999")
    first, second = send(listener, NEW, again)
    assert msa_code(first) == "AA"
    assert msa_code(second) == "AE"
    assert [(loc, code) for loc, code, _ in err_fields(second)] == [("OBR-20", "205")]
    assert len(steps(sessions)) == 1


def test_unsupported_order_control_is_a_table_error(listener: int) -> None:
    [reply] = send(listener, order_control("HD", "", "RIS000904"))
    assert msa_code(reply) == "AE"
    assert [(loc, code) for loc, code, _ in err_fields(reply)] == [("ORC-1", "103")]


def test_xo_removes_steps_no_longer_in_the_message(listener: int, sessions: sessionmaker[Session]) -> None:
    omi = sample("omi_o23_two_steps.hl7")
    segments = omi.split(b"\r")
    without_b = b"\r".join(s for s in segments if b"SPS501B" not in s)
    changed = with_control_id(without_b, "OMI0000502").replace(b"ORC|NW|", b"ORC|XO|")
    replies = send(listener, omi, changed)
    assert [ack_of(r, "utf-8").value(ack_of(r, "utf-8").first("MSA"), 1) for r in replies] == ["CA", "CA"]
    assert [s.sps_id for s in steps(sessions)] == ["SPS501A"]


def test_unsupported_message_type_is_stored_and_refused_with_200(
        listener: int, sessions: sessionmaker[Session]) -> None:
    oru = b"MSH|^~\\&|LAB|HOSP|WL|RAD|20261123||ORU^R01|LAB1|P|2.5.1\rPID|1||X1\r"
    [reply] = send(listener, oru)
    assert msa_code(reply) == "AR"
    assert [(loc, code) for loc, code, _ in err_fields(reply)] == [("MSH-9", "200")]
    with sessions() as session:
        row = session.scalars(select(InboundMessage)).one()
    assert (row.status, row.raw, row.ack_code) == ("rejected", oru, "AR")


def test_undecodable_bytes_are_refused(listener: int, sessions: sessionmaker[Session]) -> None:
    bad = b"MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||ADT^A08|U1|P|2.5.1||||||UNICODE UTF-8\rPID|1||X1||\xff\xfe\r"
    [reply] = send(listener, bad)
    assert msa_code(reply) == "AR"
    assert ("MSH-18", "102") in {(loc, code) for loc, code, _ in err_fields(reply)}
    with sessions() as session:
        assert session.scalars(select(Patient)).all() == []
        assert session.scalars(select(InboundMessage.raw)).one() == bad


def test_japanese_order_in_iso_2022_ir_87(listener: int, sessions: sessionmaker[Session]) -> None:
    from pydicom import Dataset

    text = (NEW.decode("latin-1").replace("8859/1", "ISO IR87").replace("MÜLLER^ERIKA^A^^FRAU", "山田^太郎")
            .replace("RIS000101", "JP0001"))
    [reply] = send(listener, text.encode("iso2022_jp"))
    assert msa_code(reply) == "AA"
    assert ack_of(reply, "iso2022_jp").value(ack_of(reply, "iso2022_jp").msh, 18) == "ISO IR87"
    [step] = steps(sessions)
    assert step.item["00080005"]["Value"] == [None, "ISO 2022 IR 87"]  # \ISO 2022 IR 87
    assert step.specific_character_set == "\\ISO 2022 IR 87"
    dataset = Dataset.from_json(step.item)
    assert dataset.SpecificCharacterSet == ["", "ISO 2022 IR 87"]
    assert str(dataset.PatientName) == "山田^太郎"


def test_unknown_character_set_is_refused(listener: int) -> None:
    bad = b"MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||ADT^A08|U2|P|2.5.1||||||KLINGON\rPID|1||X1\r"
    [reply] = send(listener, bad)
    assert msa_code(reply) == "AR"


def test_garbage_in_a_frame_gets_ar_and_is_archived(listener: int, sessions: sessionmaker[Session]) -> None:
    [reply] = send(listener, b"this is not HL7 at all")
    assert msa_code(reply) == "AR"
    with sessions() as session:
        assert session.scalars(select(InboundMessage.status)).one() == "rejected"


def test_order_for_unknown_patient_creates_the_patient(listener: int, sessions: sessionmaker[Session]) -> None:
    send(listener, NEW)
    with sessions() as session:
        patient = session.scalars(select(Patient)).one()
    assert (patient.patient_id, patient.issuer, patient.patient_name) == ("MRN4711", "GENHOSP",
                                                                         "MÜLLER^ERIKA^A^FRAU")


@pytest.mark.parametrize("event", ["A01", "A04", "A05"])
def test_registration_creates_and_a31_updates(listener: int, sessions: sessionmaker[Session], event: str) -> None:
    registration = (f"MSH|^~\\&|ADT|HOSP|WL|RAD|20261123||ADT^{event}|A1|P|2.3.1\rEVN|{event}\r".encode()
                    + b"PID|1||P9^^^HOSP||ROE^RICHARD||19500505|M\r")
    a31 = registration.replace(f"ADT^{event}|A1".encode(), b"ADT^A31|A2").replace(b"ROE^RICHARD", b"ROE^RICK")
    [first] = send(listener, registration)
    with sessions() as session:
        assert session.scalars(select(Patient.patient_name)).one() == "ROE^RICHARD"
    [second] = send(listener, a31)
    assert [msa_code(first), msa_code(second)] == ["AA", "AA"]
    with sessions() as session:
        patient = session.scalars(select(Patient)).one()
    assert (patient.patient_name, patient.birth_date, patient.sex) == ("ROE^RICK", "19500505", "M")


def test_a10_marks_todays_steps_arrived(listener: int, sessions: sessionmaker[Session]) -> None:
    a10 = (b"MSH|^~\\&|ADT|GENHOSP|WL|RAD|20261123091000||ADT^A10|A10X|P|2.3.1\rEVN|A10|20261123091000\r"
           b"PID|1||MRN4711^^^GENHOSP^MR||M\xdcLLER^ERIKA\rPV1|1|O\r")
    assert [msa_code(r) for r in send(listener, NEW, a10)] == ["AA", "AA"]
    assert steps(sessions)[0].sps_status == "ARRIVED"


def test_a47_changes_the_identifier(listener: int, sessions: sessionmaker[Session]) -> None:
    a47 = (b"MSH|^~\\&|ADT|GENHOSP|WL|RAD|20261123||ADT^A47|A47X|P|2.5.1\rEVN|A47\r"
           b"PID|1||MRN4711NEW^^^GENHOSP^MR||M\xdcLLER^ERIKA\rMRG|MRN4711^^^GENHOSP^MR\r")
    assert [msa_code(r) for r in send(listener, NEW, a47)] == ["AA", "AA"]
    [step] = steps(sessions)
    assert item_value(step, "PatientID") == "MRN4711NEW"
    with sessions() as session:
        ids = session.scalars(select(Patient.patient_id)).all()
    assert ids == ["MRN4711NEW"]


def test_circular_merge_is_refused(listener: int) -> None:
    merge = sample("adt_a40_merge.hl7")
    back = (b"MSH|^~\\&|EPICADT|GENHOSP|WL|RAD|20261123||ADT^A40|ADTBACK|P|2.3.1\rEVN|A40\r"
            b"PID|1||MRN4711^^^GENHOSP^MR||M\xdcLLER^ERIKA\rMRG|MRN1000^^^GENHOSP^MR\r")
    first, second = send(listener, merge, back)
    assert msa_code(first) == "AA"
    assert msa_code(second) == "AE"
    assert [(loc, code) for loc, code, _ in err_fields(second)] == [("MRG-1", "207")]
    self_merge = back.replace(b"ADTBACK", b"ADTSELF").replace(b"MRG|MRN1000", b"MRG|MRN4711")
    [third] = send(listener, self_merge)
    assert msa_code(third) == "AE"


def obr(code: str, accession: str, rp_id: str, sps_id: str, modality: str) -> bytes:
    """An OBR segment with the fields the default mapping reads, at their positions."""
    fields = [""] * 25
    fields[0], fields[1], fields[2], fields[4] = "OBR", "1", "PL^CERNER", code
    fields[18], fields[19], fields[20], fields[24] = accession, rp_id, sps_id, modality
    return "|".join(fields).encode() + b"\r"


def test_omg_o19_schedules_one_step_per_order_group(listener: int, sessions: sessionmaker[Session]) -> None:
    omg = (b"MSH|^~\\&|CERNER|CITYMED|WL|RAD|20261123||OMG^O19^OMG_O19|OMG1|P|2.5.1\r"
           b"PID|1||55502^^^CITYMED^MR||PARK^JI||19900101|F\r"
           b"ORC|NW|PL-601^CERNER|||SC\rTQ1|1||||||20261124080000||R\r"
           + obr("USABD^US ABDOMEN^LOCAL", "ACC601", "RP601", "SPS601", "US")
           + b"ORC|NW|PL-602^CERNER|||SC\rTQ1|1||||||20261124090000||R\r"
           + obr("USNECK^US NECK^LOCAL", "ACC602", "RP602", "SPS602", "US"))
    [reply] = send(listener, omg)
    assert msa_code(reply) == "AA"
    found = steps(sessions)
    assert [(s.accession_number, s.sps_id, s.modality, s.sps_start_time) for s in found] == [
        ("ACC601", "SPS601", "US", "080000"), ("ACC602", "SPS602", "US", "090000")]
    assert found[0].study_instance_uid != found[1].study_instance_uid  # generated, one per procedure


def test_many_messages_on_one_connection_and_many_senders_at_once(
        listener: int, sessions: sessionmaker[Session]) -> None:
    def order(n: int) -> bytes:
        return (with_control_id(NEW, f"CC{n:05d}").replace(b"PO-77001", f"PO-{n}".encode())
                .replace(b"ACC77001", f"ACC{n}".encode()).replace(b"SPS77001", f"SPS{n}".encode())
                .replace(b"77001^WLBROKER", f"{n}^WLBROKER".encode()).replace(b"FO-77001", f"FO-{n}".encode()))

    codes: list[str] = []
    lock = threading.Lock()

    def sender(start: int) -> None:
        with MLLPClient("127.0.0.1", listener) as client:
            for n in range(start, start + 25):
                code = msa_code(client.send(order(n)))
                with lock:
                    codes.append(code)

    threads = [threading.Thread(target=sender, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == ["AA"] * 100
    assert len(steps(sessions)) == 100
    with sessions() as session:
        assert len(session.scalars(select(Patient)).all()) == 1  # one patient, created once under concurrency


def test_python_hl7_client_gets_the_ack(listener: int, sessions: sessionmaker[Session]) -> None:
    """Any MLLP client works: python-hl7's client (what its mllp_send tool uses)."""
    from hl7.client import MLLPClient as Hl7Client

    with Hl7Client("127.0.0.1", listener, encoding="latin-1") as client:
        reply = client.send_message(NEW.decode("latin-1"))
    assert "MSA|AA|RIS000101" in str(reply)
    assert len(steps(sessions)) == 1
