"""RFC 5424 messages and RFC 5425 octet-counting framing of the audit messages."""

from __future__ import annotations

import re
from datetime import datetime

from broker.audit.syslog import BOM, MSGID, message, octet_counted

XML = "<AuditMessage>Ü</AuditMessage>"


def test_header_fields_bom_and_utf8_message() -> None:
    raw = message(XML, when=datetime(2026, 12, 4, 10, 0, 0, 5000), hostname="broker-host", app_name="broker",
                  procid="4242", failed=False)
    header, _, body = raw.partition(BOM)
    fields = header.decode("ascii").split(" ")
    assert fields[0] == "<85>1"  # authpriv (10) * 8 + notice (5), version 1
    assert re.fullmatch(r"2026-12-04T10:00:00\.005[+-]\d\d:\d\d", fields[1])
    assert fields[2:7] == ["broker-host", "broker", "4242", MSGID, "-"]
    assert fields[7] == ""  # one space before the BOM
    assert body.decode("utf-8") == XML


def test_a_failure_is_a_warning_and_empty_fields_are_nil() -> None:
    raw = message(XML, when=datetime(2026, 1, 1), hostname="", app_name="bro ker\x01", procid="", failed=True)
    fields = raw.partition(BOM)[0].decode("ascii").split(" ")
    assert fields[0] == "<84>1"  # warning (4)
    assert fields[2:5] == ["-", "broker", "-"]


def test_octet_counting_gives_the_byte_length_of_the_message() -> None:
    raw = message(XML, when=datetime(2026, 1, 1), hostname="h", app_name="a", procid="1", failed=False)
    framed = octet_counted(raw)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(raw) == len(rest)
    assert rest == raw
    assert octet_counted(b"ab") + octet_counted(b"c") == b"2 ab1 c"
