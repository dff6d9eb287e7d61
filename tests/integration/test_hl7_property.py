"""Property-based: random and garbled HL7 into the real intake never crashes the listener, and every
frame gets an ACK (or the connection is closed cleanly)."""

from __future__ import annotations

import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.hl7.message import parse
from broker.hl7.mllp_client import MLLPClient, MLLPError
from tests.conftest import SAMPLES
from tests.hl7_support import msa_code

pytestmark = pytest.mark.integration

SAMPLE_MESSAGES = [p.read_bytes() for p in sorted(SAMPLES.glob("*.hl7"))]


@st.composite
def garbled(draw: st.DrawFn) -> bytes:
    """A sample with random edits: cut, spliced bytes, swapped delimiters, doubled segments."""
    raw = bytearray(draw(st.sampled_from(SAMPLE_MESSAGES)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["cut", "insert", "replace", "delimiter"]))
        pos = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "cut":
            del raw[pos:pos + draw(st.integers(1, 40))]
        elif op == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=20).filter(lambda b: b"\x1c\x0d" not in b
                                                                           and b"\x0b" not in b))
        elif op == "replace" and raw:
            raw[pos] = draw(st.sampled_from(b"|^~\\&\r\n\"x\xff"))
        elif op == "delimiter":
            raw = bytearray(raw.replace(b"|", draw(st.sampled_from([b"^", b"||", b"|\r"])), 3))
    return bytes(raw).replace(b"\x0b", b"").replace(b"\x1c", b"")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=st.one_of(garbled(), st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"")
                                                                  .replace(b"\x1c", b""))))
def test_garbled_messages_get_an_ack(listener: int, message: bytes) -> None:
    with MLLPClient("127.0.0.1", listener, timeout=20) as client:
        try:
            reply = client.send(message)
        except MLLPError:
            reply = b""
    if reply:
        d = parse(reply.decode("latin-1")).delimiters  # parse() refuses letters, spaces or repeats
        assert len({d.field, d.component, d.repetition, d.escape, d.subcomponent}) == 5
        assert msa_code(reply) in {"AA", "AE", "AR", "CA", "CE", "CR"}
    # and the listener still answers a good message on a new connection
    with MLLPClient("127.0.0.1", listener, timeout=20) as client:
        ok = client.send(b"MSH|^~\\&|T|T|WL|RAD|20261123||ADT^A08|PING|P|2.5.1\rPID|1||PING1||DOE\r")
    assert msa_code(ok) in {"AA", "AE"}


def test_raw_socket_garbage_then_close_does_not_hurt(listener: int) -> None:
    for junk in (b"\x0b\x0b\x0b", b"GET / HTTP/1.1\r\n\r\n", b"\x1c\x0d" * 10, bytes(range(256))):
        with socket.create_connection(("127.0.0.1", listener), timeout=5) as sock:
            sock.sendall(junk)
    with MLLPClient("127.0.0.1", listener) as client:
        assert msa_code(client.send(b"MSH|^~\\&|T|T|WL|RAD|2026||ADT^A08|P2|P|2.5.1\rPID|1||P2||X\r")) == "AA"
