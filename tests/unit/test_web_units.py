"""Pieces of the web package that need no server: token settings, the HL7 message a step request
becomes, reading the intake's recorded problems, MSH-10 rewriting for replays, metric labels."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.config import SettingsError, load_settings, parse_api_tokens
from broker.hl7.message import parse
from broker.metrics import _message_type
from broker.web.auth import TokenBook
from broker.web.intake_bridge import new_control_id, parse_problems
from broker.web.messages import _with_control_id
from broker.web.steps import StepIn, order_message

READ = "r" * 20
WRITE = "w" * 20


def test_api_tokens_setting() -> None:
    assert parse_api_tokens(f" {READ}:read, {WRITE}:write ") == {READ: "read", WRITE: "write"}
    assert parse_api_tokens("") == {}
    assert load_settings(api_tokens=f"{READ}:read").api_token_roles == {READ: "read"}
    with pytest.raises(SettingsError, match="token:role") as bad_role:
        load_settings(api_tokens=f"{READ}:admin")
    assert READ not in str(bad_role.value)  # a secret is never echoed
    with pytest.raises(SettingsError, match="at least 16"):
        load_settings(api_tokens="short:read")


def test_token_book_finds_the_role_and_a_safe_label() -> None:
    book = TokenBook({READ: "read", WRITE: "write"})
    reader, writer = book.caller(READ), book.caller(WRITE)
    assert reader is not None and reader.role == "read"
    assert writer is not None and writer.role == "write" and WRITE not in writer.label
    assert book.caller("") is None and book.caller(READ + "x") is None and book.caller(None) is None


def body(**changes: object) -> StepIn:
    values: dict[str, object] = {
        "patient_id": "P|1", "issuer_of_patient_id": "CITY", "patient_name": "DOE^JANE^^DR^JR",
        "patient_birth_date": "1970-01-02", "patient_sex": "F", "placer_order_number": "WEB-1",
        "placer_issuer": "PORTAL", "filler_order_number": "F-1", "accession_number": "A1", "modality": "MR",
        "procedure_code": {"value": "MRB", "meaning": "MR BRAIN & SPINE"}, "station_ae_title": "MR1",
        "station_name": "ROOM 1", "location": "SUITE A", "scheduled_start": "2026-11-23T10:15:00",
        "priority": "STAT", "referring_physician": "HOUSE^GREGORY", "requesting_physician": "GRAY^MEREDITH",
        "admission_id": "V1", "patient_location": "WARD3"}
    values.update(changes)
    return StepIn.model_validate(values)


def test_a_new_step_becomes_an_omi_o23_with_every_field_in_place() -> None:
    raw = order_message("NW", body(), "API1", datetime(2026, 11, 23, 8, 0))
    message = parse(raw.decode("utf-8"))
    v = message.value
    msh, pid, pv1, orc = message.msh, message.first("PID"), message.first("PV1"), message.first("ORC")
    tq1, obr, ipc = message.first("TQ1"), message.first("OBR"), message.first("IPC")
    assert (v(msh, 3), v(msh, 4), v(msh, 9, 1), v(msh, 9, 2), v(msh, 10), v(msh, 12), v(msh, 18)) == (
        "WLBROKER_API", "HTTP", "OMI", "O23", "API1", "2.5.1", "UNICODE UTF-8")
    assert (v(pid, 3, 1), v(pid, 3, 4), v(pid, 7), v(pid, 8)) == ("P|1", "CITY", "19700102", "F")
    # XPN puts the suffix before the prefix (DICOM PN: prefix, then suffix)
    assert [v(pid, 5, c) for c in range(1, 6)] == ["DOE", "JANE", "", "JR", "DR"]
    assert (v(pv1, 3), v(pv1, 8, 2), v(pv1, 8, 3), v(pv1, 19)) == ("WARD3", "HOUSE", "GREGORY", "V1")
    assert (v(orc, 1), v(orc, 2, 1), v(orc, 2, 2), v(orc, 3, 1), v(orc, 5)) == ("NW", "WEB-1", "PORTAL", "F-1", "SC")
    assert (v(tq1, 7), v(tq1, 9)) == ("20261123101500", "S")
    assert (v(obr, 4, 1), v(obr, 4, 2), v(obr, 4, 3), v(obr, 16, 2), v(obr, 24)) == (
        "MRB", "MR BRAIN & SPINE", "LOCAL", "GRAY", "MR")
    assert [v(ipc, n) for n in range(1, 10)] == ["A1", "", "", "", "MR", "MRB", "ROOM 1", "SUITE A", "MR1"]


def test_a_cancel_names_the_order_only() -> None:
    raw = order_message("CA", body(), "API2", datetime(2026, 11, 23, 8, 0))
    message = parse(raw.decode("utf-8"))
    assert [s.name for s in message.segments] == ["MSH", "PID", "ORC"]
    assert (message.value(message.first("ORC"), 1), message.value(message.first("ORC"), 5)) == ("CA", "CA")


def test_control_ids_are_unique_and_short() -> None:
    ids = {new_control_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) <= 20 and i.startswith("API") for i in ids)


def test_recorded_problems_are_read_back() -> None:
    problems = parse_problems("101 IPC-1: AccessionNumber is required; 102 TQ1-7.1: not a date; "
                              "207: OperationalError: gone")
    assert [(p.code, p.location, p.text) for p in problems] == [
        ("101", "IPC-1", "AccessionNumber is required"), ("102", "TQ1-7.1", "not a date"),
        ("207", "", "OperationalError: gone")]
    assert parse_problems("") == []


def test_replay_rewrites_only_msh_10() -> None:
    raw = b"MSH|^~\\&|RIS|H|WL|R|20261123||ORM^O01|C1|P|2.3.1\rPID|1||X\r"
    assert _with_control_id(raw, "C1-R1") == b"MSH|^~\\&|RIS|H|WL|R|20261123||ORM^O01|C1-R1|P|2.3.1\rPID|1||X\r"
    short = b"MSH|^~\\&|RIS|H|WL|R|20261123||ORM^O01\r"
    assert parse(_with_control_id(short, "C9").decode()).value(parse(_with_control_id(short, "C9").decode()).msh,
                                                                  10) == "C9"


def test_metric_message_type_label() -> None:
    assert _message_type(b"\x0bMSH|^~\\&|A|B|C|D|2026||ORM^O01^ORM_O01|1|P|2.5\r") == "ORM^O01"
    assert _message_type(b"garbage") == "unknown"
    assert _message_type(b"MSH|^~\\&|A|B\r") == "unknown"


def test_a_start_with_a_zone_is_scheduled_in_local_time() -> None:

    from broker.web.steps import local_time

    aware = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    assert local_time(aware) == aware.astimezone().replace(tzinfo=None)
    assert local_time(datetime(2026, 11, 23, 9, 0)) == datetime(2026, 11, 23, 9, 0)
