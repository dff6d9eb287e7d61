"""ACK construction: MSA, ERR per problem in the message's version, enhanced acknowledgement mode."""

from __future__ import annotations

from broker.hl7.ack import Header, _escape, acknowledgements, build_ack
from broker.hl7.errors import Problem
from broker.hl7.message import Delimiters, parse

V231 = b"MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||ORM^O01|C1|P|2.3.1||||||8859/1\rPID|1\r"
V251 = b"MSH|^~\\&|RIS|HOSP|WL|RAD|20261123||OMI^O23^OMI_O23|C2|P|2.5.1\rPID|1\r"


def test_ack_swaps_sender_and_receiver_and_echoes_control_id_and_charset() -> None:
    ack = parse(build_ack(Header.from_raw(V231), "AA", []))
    assert ack.value(ack.msh, 3) == "WL" and ack.value(ack.msh, 5) == "RIS"
    assert ack.message_type == ("ACK", "O01")
    assert ack.value(ack.msh, 12) == "2.3.1"
    assert ack.value(ack.msh, 18) == "8859/1"
    assert ack.value(ack.first("MSA"), 1) == "AA" and ack.value(ack.first("MSA"), 2) == "C1"
    assert ack.control_id and ack.control_id != "C1"


def test_v231_err_uses_err1_location_and_code() -> None:
    problems = [Problem("102", "bad | date", "PID", 1, 7), Problem("101", "missing", "OBR", 1, 18)]
    ack = parse(build_ack(Header.from_raw(V231), "AE", problems))
    errs = ack.all("ERR")
    assert len(errs) == 2
    assert [ack.value(errs[0], 1, i) for i in (1, 2, 3)] == ["PID", "1", "7"]
    assert ack.value(errs[0], 1, 4, 1) == "102"
    assert "bad | date" in ack.value(errs[0], 1, 4, 2)  # delimiters in text are escaped, not broken
    assert ack.value(errs[1], 1, 4, 1) == "101"


def test_v25_err_uses_err2_err3_err4() -> None:
    ack = parse(build_ack(Header.from_raw(V251), "AE", [Problem("102", "bad", "ORC", 2, 7, 4)]))
    err = ack.first("ERR")
    assert [ack.value(err, 2, i) for i in (1, 2, 3, 5)] == ["ORC", "2", "7", "4"]
    assert ack.value(err, 3, 1) == "102" and ack.value(err, 3, 3) == "HL70357"
    assert ack.value(err, 4) == "E"
    assert ack.value(err, 8) == "bad"


def test_original_mode_gives_one_ack() -> None:
    assert len(acknowledgements(Header.from_raw(V231), "AA", [])) == 1


def test_enhanced_mode_honours_msh15_and_msh16() -> None:
    def header(accept: str, application: str) -> Header:
        raw = V251.replace(b"|2.5.1", f"|2.5.1|||{accept}|{application}".encode())
        return Header.from_raw(raw)

    def codes(h: Header, outcome: str) -> list[str]:
        return [parse(a).value(parse(a).first("MSA"), 1) for a in acknowledgements(h, outcome, [])]

    assert codes(header("AL", "NE"), "AA") == ["CA"]
    assert codes(header("AL", "AL"), "AA") == ["CA", "AA"]
    assert codes(header("NE", "AL"), "AE") == ["AE"]
    assert codes(header("ER", "NE"), "AA") == []
    assert codes(header("ER", "NE"), "AR") == ["CR"]
    assert codes(header("NE", "SU"), "AE") == []


def test_header_from_garbage_is_empty_not_an_exception() -> None:
    assert Header.from_raw(b"\x00\xffnot hl7").control_id == ""


def _escape_in_turn(text: str, d: Delimiters) -> str:
    """_escape as it was written before its translate table: one replacement after the other."""
    out = text.replace(d.escape, f"{d.escape}E{d.escape}")
    for char, code in ((d.field, "F"), (d.component, "S"), (d.subcomponent, "T"), (d.repetition, "R")):
        out = out.replace(char, f"{d.escape}{code}{d.escape}")
    return out.replace("\r", " ").replace("\n", " ")


def test_escape_table_gives_the_replacements_in_turn() -> None:
    texts = ["plain", "", "a|b^c~d\\e&f", "\\E\\ already", "line\r\nbreak", "#$*!@ mixed |^"]
    for d in (Delimiters(), Delimiters("#", "$", "*", "!", "@"), Delimiters("|", "^", "~", "\\", "^")):
        for text in texts:
            assert _escape(text, d) == _escape_in_turn(text, d), (text, d)


def test_ack_with_other_delimiters_escapes_with_them() -> None:
    header = Header.from_raw(b"MSH#$*!@#RIS#HOSP#WL#RAD#20261123##ORM$O01#C9#P#2.3.1\r")
    ack = build_ack(header, "AE", [], "bad # and $ here")
    assert "\rMSA#AE#C9#bad !F! and !S! here\r" in ack
