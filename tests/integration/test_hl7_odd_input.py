"""Odd HL7 input to ``broker run`` from outside, on SQLite and PostgreSQL.

Control characters (NUL above all: PostgreSQL text cannot hold it) get an error ACK naming the field on
a connection that stays open, and the archive keeps the exact bytes. Escaped delimiters (``\\T\\`` for
``&``) are literal text, over MLLP and over ``POST /api/steps``, read back over the API and C-FIND.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from sqlalchemy import Engine, select

from broker.hl7.message import parse
from broker.hl7.mllp_client import MLLPClient
from broker.outbound.ris_hl7 import build_status_message
from broker.store.session import make_engine
from broker.store.tables import InboundMessage, Patient
from tests.conftest import module_database, sample
from tests.hl7_support import ack_of, err_fields, msa_code, with_control_id
from tests.integration.test_cli import broker_run, env_for, free_port, run_cli
from tests.integration.test_mwl_scp import c_find

pytestmark = pytest.mark.integration
READ, WRITE = "read-token-0123456789", "write-token-0123456789"
NEW = sample("orm_o01_new.hl7")


@dataclass
class Broker:
    engine: Engine
    hl7_port: int
    dicom_port: int
    http_port: int

    def client(self) -> MLLPClient:
        return MLLPClient("127.0.0.1", self.hl7_port, timeout=20)

    def http(self, method: str, path: str, body: Any = None, token: str = READ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method,
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One ``broker run`` per backend for the module; every test uses its own ids."""
    for url in module_database(request.param, tmp_path_factory, "odd_input"):
        hl7_port, dicom_port, http_port = free_port(), free_port(), free_port()
        env = env_for(url, BROKER_HL7_PORT=str(hl7_port), BROKER_DICOM_PORT=str(dicom_port),
                      BROKER_HTTP_PORT=str(http_port), BROKER_API_TOKENS=f"{READ}:read,{WRITE}:write")
        with broker_run(env, hl7_port, dicom_port, http_port):
            engine = make_engine(url)
            try:
                yield Broker(engine, hl7_port, dicom_port, http_port)
            finally:
                engine.dispose()


def order(number: int, *, name: bytes = b"M\xdcLLER^ERIKA^A^^FRAU") -> bytes:
    """The sample order as a new order of its own patient, with PID-5 ``name``."""
    raw = with_control_id(NEW, f"ODD{number:05d}")
    for old in (b"O-77001", b"ACC77001", b"RP77001", b"SPS77001", b".77001^"):
        raw = raw.replace(old, old.replace(b"77001", b"9%04d" % number))
    return raw.replace(b"MRN4711", b"MRN9%04d" % number).replace(b"M\xdcLLER^ERIKA^A^^FRAU", name)


def archived(engine: Engine, raw: bytes) -> list[Any]:
    with engine.connect() as db:
        return [r for r in db.execute(select(InboundMessage).order_by(InboundMessage.id)) if bytes(r.raw) == raw]


def patient_exists(engine: Engine, number: int) -> bool:
    with engine.connect() as db:
        return db.execute(select(Patient.id).where(Patient.patient_id == f"MRN9{number:04d}")).first() is not None


# --- item 1: control characters ---------------------------------------------------------------------
NUL_CASES = {
    # case: (edit of the order, MSA-1, ERR location)
    "MSH-3": (lambda raw: raw.replace(b"|EPICRIS|", b"|EPI\x00CRIS|", 1), "AR", "MSH-3"),
    "MSH-9": (lambda raw: raw.replace(b"|ORM^O01|", b"|ORM^O\x0001|", 1), "AR", "MSH-9.2"),
    "MSH-10": (lambda raw: raw.replace(b"|ODD", b"|OD\x00D", 1), "AR", "MSH-10"),
    "PID-5": (lambda raw: raw.replace(b"^ERIKA^", b"^ERI\x00KA^", 1), "AE", "PID-5.2"),
    "PID-5 escaped": (lambda raw: raw.replace(b"M\xdcLLER^", b"M\xdcL\\X00\\LER^", 1), "AE", "PID-5.1"),
    "PID-5 other control": (lambda raw: raw.replace(b"^ERIKA^", b"^ERI\x1bKA^", 1), "AE", "PID-5.2"),
    "OBR-4 text": (lambda raw: raw.replace(b"CT ABDOMEN", b"CT AB\x00DOMEN", 1), "AE", "OBR-4.5"),
    "Z segment": (lambda raw: raw.replace(b"^WLBROKER^", b"^WL\x00BROKER^", 1), "AE", "ZDS-1.2"),
}


@pytest.mark.parametrize("case", list(NUL_CASES))
def test_a_control_character_gets_an_error_ack_naming_the_field(broker: Broker, case: str) -> None:
    edit, code, location = NUL_CASES[case]
    number = list(NUL_CASES).index(case) + 1
    odd, good = edit(order(number)), order(100 + number)
    with broker.client() as client:
        reply = client.send(odd)
        assert msa_code(reply) == code, reply
        # v2.3.1's ERR-1 names segment and field; the archive's error names the component too
        assert [(loc, err) for loc, err, _ in err_fields(reply)] == [(location.split(".")[0], "102")]
        assert b"\x00" not in reply and b"\x1b" not in reply
        if case == "MSH-10":  # MSA-2 still names the message: NUL as its hex escape, read back as NUL
            ack = ack_of(reply)
            assert ack.value(ack.first("MSA"), 2) == f"OD\x00D{number:05d}"
        assert msa_code(client.send(odd)) == code  # a repeat: the same answer, recognised as a repeat
        assert msa_code(client.send(good)) == "AA"  # the same connection goes on
    assert not patient_exists(broker.engine, number) and patient_exists(broker.engine, 100 + number)
    first, repeat = archived(broker.engine, odd)
    assert (first.status, first.ack_code) == ({"AR": "rejected", "AE": "error"}[code], code)
    assert repeat.status == "duplicate" and repeat.duplicate_of_id == first.id
    assert first.error.startswith(f"102 {location}: control character U+00")
    assert "\x00" not in first.control_id + first.sender + first.message_type + first.error


def test_an_archived_nul_message_is_viewed_and_replayed_over_http(broker: Broker) -> None:
    odd = order(50).replace(b"|ODD", b"|OD\x00D", 1).replace(b"^ERIKA^", b"^ERI\x00KA^", 1)
    with broker.client() as client:
        assert msa_code(client.send(odd)) == "AR"
    [row] = archived(broker.engine, odd)
    assert row.control_id == "OD\\X00\\D00050"  # the text column holds the hex escape, the raw column the bytes
    status, found = broker.http("GET", "/api/messages?control_id=OD%5CX00%5CD00050")
    assert status == 200 and [m["id"] for m in found["items"]] == [row.id]
    status, view = broker.http("GET", f"/api/messages/{row.id}")
    assert status == 200
    assert view["text"].encode("latin-1") == odd.rstrip(b"\r").replace(b"\r", b"\n")
    status, replayed = broker.http("POST", f"/api/messages/{row.id}/replay", token=WRITE)
    assert status == 200 and replayed["ack_code"] == "AR" and "MSH-10" in replayed["error"]


# --- item 2: escaped delimiters and subcomponents in names ------------------------------------------
def api_and_worklist_name(broker: Broker, accession: str) -> tuple[str, str]:
    """The patient name of the procedure with ``accession`` as the REST API and a C-FIND answer it."""
    status, page = broker.http("GET", f"/api/procedures?accession={accession}")
    assert status == 200, page
    [procedure] = page["items"]
    query = Dataset()
    query.AccessionNumber, query.PatientName, query.ScheduledProcedureStepSequence = accession, "", [Dataset()]
    pending, found, final = c_find(broker.dicom_port, query)
    assert final.Status == 0 and len(found) == 1, (pending, final)
    return procedure["patient_name"], str(found[0].PatientName)


NAMES = {
    # PID-5 as sent: the DICOM Patient's Name stored
    b"SMITH\\T\\JONES^ANN": "SMITH&JONES^ANN",  # \T\ is a literal &, not a subcomponent
    b"VAN&DER&BERG^ANNA": "VAN DER BERG^ANNA",  # FN.1 lacks the other parts: all of them, joined
    b"VAN DEN BERG&VAN DEN&BERG^ANNA": "VAN DEN BERG^ANNA",  # FN.1 holds them: FN.1
    b"&van der&Berg^Anna": "van der Berg^Anna",  # no FN.1: prefix and own surname
    b"O\\F\\BRIEN\\R\\\\S\\X^SEAN\\T\\PAT": "O|BRIEN~ X^SEAN&PAT",  # \S\ would split the PN: a space
    b"\\X41\\BC^\\E\\D": "ABC^D",  # a hex escape is text; \E\ is a backslash, which PN cannot hold: a space (trimmed)
}


@pytest.mark.parametrize("sent", list(NAMES))
def test_escapes_and_subcomponents_in_a_name_are_kept_as_text(broker: Broker, sent: bytes) -> None:
    number = 200 + list(NAMES).index(sent)
    with broker.client() as client:
        assert msa_code(client.send(order(number, name=sent))) == "AA"
    assert api_and_worklist_name(broker, f"ACC9{number:04d}") == (NAMES[sent], NAMES[sent])


def test_a_name_with_an_ampersand_over_http_is_kept(broker: Broker) -> None:
    body = {"patient_id": "P-AMP", "patient_name": "SMITH&JONES^ANN", "placer_order_number": "WEB-AMP",
            "accession_number": "WAMP1", "modality": "MR", "scheduled_start": "2026-11-23T10:15:00",
            "referring_physician": "O'NEIL&CO^PAT"}
    status, created = broker.http("POST", "/api/steps", body, token=WRITE)
    assert status == 201, created
    assert api_and_worklist_name(broker, "WAMP1") == ("SMITH&JONES^ANN", "SMITH&JONES^ANN")
    with broker.engine.connect() as db:
        [raw] = [bytes(r.raw) for r in db.execute(select(InboundMessage.raw).where(
            InboundMessage.control_id == created["control_id"]))]
    assert b"|SMITH\\T\\JONES^ANN|" in raw and b"^O'NEIL\\T\\CO^PAT|" in raw
    nul = {**body, "patient_name": "DOE\x00^JANE", "placer_order_number": "WEB-NUL", "accession_number": "WNUL1"}
    status, refused = broker.http("POST", "/api/steps", nul, token=WRITE)
    assert status == 422 and [d["loc"] for d in refused["detail"]] == [["body", "patient_name"]], refused


def test_status_messages_to_the_ris_write_the_name_as_an_escaped_xpn() -> None:
    payload = {"at": "20261123094500", "sender": "EPI|RIS^GEN&HOSP", "patient_id": "MRN^1",
               "issuer_of_patient_id": "", "patient_name": "SMITH&JONES^ANN^^DR^JR", "placer_order_number": "PO-1",
               "placer_issuer": "", "filler_order_number": "FO-1", "filler_issuer": "", "order_status": "CM",
               "requested_procedure_id": "RP1", "description": "CT CHEST & ABDOMEN\x00", "accession_number": "ACC1",
               "study_instance_uid": "1.2.3"}
    text = build_status_message(payload, "ORM^O01", "0b5c5d1e-0000-4000-8000-000000000000")
    assert "\x00" not in text
    message = parse(text)
    pid, obr = message.first("PID"), message.first("OBR")
    assert [message.value(pid, 5, n) for n in (1, 2, 4, 5)] == ["SMITH&JONES", "ANN", "JR", "DR"]
    assert message.value(pid, 3) == "MRN^1" and message.value(message.msh, 5) == "EPI|RIS"
    assert message.value(obr, 4, 2) == "CT CHEST & ABDOMEN\x00"  # read back exactly (sent as \X00\)


def test_mapping_test_names_a_control_character_as_the_listener_would(tmp_path: Path) -> None:
    path = tmp_path / "nul.hl7"
    path.write_bytes(order(300).replace(b"^ERIKA^", b"^ERI\x00KA^", 1))
    result = run_cli("mapping", "test", str(path), env=env_for(f"sqlite:///{tmp_path / 'never.db'}"))
    assert result.returncode == 0, result.stderr
    assert "would be refused" in result.stdout and "ERR 102 PID-5.2: control character U+0000" in result.stdout
    assert "\x00" not in result.stdout


@pytest.mark.parametrize(("charset", "sent", "stored"), [
    (b"UNICODE UTF-8", b"M\\XC39C\\LLER^\\XC389\\LISE", "MÜLLER^ÉLISE"),
    (b"8859/1", b"M\\XDC\\LLER^\\XC9\\LISE", "MÜLLER^ÉLISE"),
])
def test_hex_escapes_are_characters_of_the_message_character_set(broker: Broker, charset: bytes, sent: bytes,
                                                                 stored: str) -> None:
    number = 250 + len(charset)
    with broker.client() as client:
        assert msa_code(client.send(order(number, name=sent).replace(b"|8859/1", b"|" + charset, 1))) == "AA"
    assert api_and_worklist_name(broker, f"ACC9{number:04d}") == (stored, stored)
