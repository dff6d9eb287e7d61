"""The MLLP listener and client over real TCP on 127.0.0.1: ordering, concurrency, limits and abuse."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import structlog.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.hl7.mllp import FrameDecoder, MLLPServer, Peer, ServerThread, encode_frame, run_in_thread
from broker.hl7.mllp_client import MLLPClient, MLLPError
from tests.mllp_reference import reference

pytestmark = pytest.mark.integration

SB, EB, CR = b"\x0b", b"\x1c", b"\r"
HOST = "127.0.0.1"


def reply_for(message: bytes) -> bytes:
    """The test handler's answer: length and checksum, so a reply proves which message it belongs to."""
    return b"ACK|%d|%08x" % (len(message), zlib.crc32(message))


def garbled(message: bytes) -> bytes:
    return b"GARBLED|%d" % len(message)


def expected_reply(message: bytes) -> bytes:
    """What a server with :func:`handler` and :func:`garbled` answers (empty frames included)."""
    return garbled(message) if not message or message.startswith(b"!") else reply_for(message)


def handler(message: bytes, peer: Peer) -> list[bytes]:
    """Fails for messages starting with "!" (to exercise ``garbled_reply``), else one ACK."""
    assert isinstance(peer, tuple) and peer[0] == HOST and isinstance(peer[1], int)
    if message.startswith(b"!"):
        raise RuntimeError("handler failure requested by the test")
    if message == b"NONE":
        return []
    if message == b"TWO":
        return [b"FIRST", b"SECOND"]
    if message == b"BAD-REPLY":
        return [b"contains\x1c\rterminator"]
    return [reply_for(message)]


def serve(message_handler: Callable[[bytes, Peer], list[bytes]] = handler, **options: Any) -> ServerThread:
    return run_in_thread(MLLPServer(message_handler, host=HOST, port=0, **options))


def read_to_close(sock: socket.socket, timeout: float) -> tuple[list[bytes], str]:
    """All reply frames until the server closes: (frames, "eof" or "reset"); fails on a hang."""
    decoder = FrameDecoder(1 << 20)
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"server neither replied nor closed within {timeout} s"
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return frames, "reset"
        except TimeoutError:
            pytest.fail(f"server neither replied nor closed within {timeout} s")
        if not data:
            return frames, "eof"
        frames.extend(decoder.feed(data))


def read_frames(sock: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    decoder = FrameDecoder(1 << 20)
    frames: list[bytes] = []
    sock.settimeout(timeout)
    while len(frames) < count:
        data = sock.recv(65536)
        assert data, f"server closed after {len(frames)} of {count} replies"
        frames.extend(decoder.feed(data))
    return frames


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def assert_alive(port: int) -> None:
    with MLLPClient(HOST, port, timeout=5) as client:
        assert client.send(b"MSH|alive") == reply_for(b"MSH|alive")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with serve(garbled_reply=garbled, idle_timeout=10, workers=8) as thread:
        yield thread


def test_hundred_messages_in_order_on_one_connection(server: ServerThread) -> None:
    with MLLPClient(HOST, server.port, timeout=5) as client:
        for i in range(100):
            message = b"MSH|^~\\&|RIS|H|BROKER|H|||ORM^O01|%d|P|2.5.1\rPID|1||%d\r" % (i, i)
            assert client.send(message) == reply_for(message)


def test_pipelined_frames_are_answered_in_order(server: ServerThread) -> None:
    messages = [b"MSH|pipelined|%d" % i for i in range(50)]
    with socket.create_connection((HOST, server.port), timeout=5) as sock:
        sock.sendall(b"".join(encode_frame(m) for m in messages))
        assert read_frames(sock, 50) == [reply_for(m) for m in messages]


def slow_conversations(workers: int, connections: int, messages: int) -> int:
    """``connections`` clients send ``messages`` each to a server whose handler takes 2 ms; every reply
    must be the right one. Returns the most handler calls that ran at the same time."""
    lock = threading.Lock()
    running = 0
    most = 0

    def slow_handler(message: bytes, peer: Peer) -> list[bytes]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.002)
        with lock:
            running -= 1
        return [reply_for(message)]

    def talk(n: int) -> list[tuple[bytes, bytes]]:
        with MLLPClient(HOST, thread.port, timeout=10) as client:
            sent = [b"MSH|conn-%d|msg-%d" % (n, i) for i in range(messages)]
            return [(client.send(m), reply_for(m)) for m in sent]

    with serve(slow_handler, workers=workers) as thread, ThreadPoolExecutor(connections) as pool:
        results = list(pool.map(talk, range(connections)))
    assert all(got == want for conversation in results for got, want in conversation)
    assert sum(len(conversation) for conversation in results) == connections * messages
    return most


def test_concurrent_connections_are_independent() -> None:
    assert slow_conversations(workers=8, connections=8, messages=50) >= 2  # handler calls did overlap


def test_max_connections_refuses_extra_connections() -> None:
    with serve(max_connections=2) as thread:
        first, second = MLLPClient(HOST, thread.port, timeout=5), MLLPClient(HOST, thread.port, timeout=5)
        assert first.send(b"one") == reply_for(b"one")
        assert second.send(b"two") == reply_for(b"two")
        assert thread.server.connection_count == 2
        with socket.create_connection((HOST, thread.port), timeout=5) as extra:
            frames, _ = read_to_close(extra, timeout=3)
            assert frames == []
        with MLLPClient(HOST, thread.port, timeout=5) as third, pytest.raises(MLLPError):
            third.send(b"three")
        first.close()
        wait_for(lambda: thread.server.connection_count == 1)
        assert_alive(thread.port)
        assert second.send(b"still") == reply_for(b"still")
        second.close()


def test_oversize_frame_closes_only_that_connection() -> None:
    with serve(max_message_bytes=1000) as thread:
        bystander = MLLPClient(HOST, thread.port, timeout=5)
        assert bystander.send(b"before") == reply_for(b"before")
        with socket.create_connection((HOST, thread.port), timeout=5) as sock:
            sock.sendall(encode_frame(b"small") + encode_frame(b"x" * 5000))
            frames, _ = read_to_close(sock, timeout=5)
        assert frames in ([], [reply_for(b"small")])
        assert_alive(thread.port)
        assert bystander.send(b"after") == reply_for(b"after")
        bystander.close()


def test_oversize_without_terminator_closes_early() -> None:
    with serve(max_message_bytes=1000) as thread, socket.create_connection((HOST, thread.port)) as sock:
        sock.sendall(SB + b"y" * 2000)  # never terminated: the server must not keep buffering
        frames, _ = read_to_close(sock, timeout=5)
        assert frames == []
        assert_alive(thread.port)


def test_idle_connection_is_closed() -> None:
    with serve(idle_timeout=0.5) as thread:
        with socket.create_connection((HOST, thread.port)) as sock:
            sock.sendall(encode_frame(b"hello"))
            assert read_frames(sock, 1) == [reply_for(b"hello")]
            started = time.monotonic()
            assert read_to_close(sock, timeout=5) == ([], "eof")
            assert time.monotonic() - started >= 0.4
        with socket.create_connection((HOST, thread.port)) as sock:
            sock.sendall(SB + b"half a frame")
            assert read_to_close(sock, timeout=5) == ([], "eof")
        wait_for(lambda: thread.server.connection_count == 0)
        assert_alive(thread.port)


def test_handler_failure_gets_garbled_reply_and_connection_goes_on(server: ServerThread) -> None:
    with MLLPClient(HOST, server.port, timeout=5) as client:
        assert client.send(b"!explode") == garbled(b"!explode")
        assert client.send(b"BAD-REPLY") == garbled(b"BAD-REPLY")  # an unframeable reply is a failure too
        assert client.send(b"next") == reply_for(b"next")


def test_handler_failure_without_garbled_reply_closes_the_connection() -> None:
    with serve() as thread, MLLPClient(HOST, thread.port, timeout=5) as client:
        assert client.send(b"first") == reply_for(b"first")
        with pytest.raises(MLLPError, match="closed the connection"):
            client.send(b"!explode")
        assert client.send(b"reconnected") == reply_for(b"reconnected")  # send() connects anew


def test_empty_frame(server: ServerThread) -> None:
    with MLLPClient(HOST, server.port, timeout=5) as client:
        assert client.send(b"") == garbled(b"")
    with serve() as thread, socket.create_connection((HOST, thread.port), timeout=5) as sock:
        sock.sendall(SB + EB + CR + encode_frame(b"after empty"))
        assert read_frames(sock, 1) == [reply_for(b"after empty")]  # the empty frame is ignored


def test_zero_and_several_replies(server: ServerThread) -> None:
    with MLLPClient(HOST, server.port, timeout=5) as client:
        client.send_no_reply(b"NONE")
        assert client.send(b"TWO") == b"FIRST"
        assert client.receive() == b"SECOND"
        assert client.send(b"last") == reply_for(b"last")


def test_junk_and_restarted_frames_are_skipped(server: ServerThread) -> None:
    with socket.create_connection((HOST, server.port), timeout=5) as sock:
        sock.sendall(b"\r\njunk" + SB + b"abandoned" + encode_frame(b"kept") + b"\n" + encode_frame(b"too"))
        assert read_frames(sock, 2) == [reply_for(b"kept"), reply_for(b"too")]


def test_terminator_split_across_writes(server: ServerThread) -> None:
    with socket.create_connection((HOST, server.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(SB + b"split\x1c")
        time.sleep(0.05)
        sock.sendall(CR)
        assert read_frames(sock, 1) == [reply_for(b"split")]


def test_client_timeout_and_unreachable_server() -> None:
    def sleepy(message: bytes, peer: Peer) -> list[bytes]:
        time.sleep(0.5)
        return [reply_for(message)]

    with serve(sleepy) as thread:
        client = MLLPClient(HOST, thread.port, timeout=0.1)
        with pytest.raises(MLLPError, match="no reply"):
            client.send(b"slow")
        assert not client.connected  # a late reply can never be taken for the next message's
        client.close()
        port = thread.port
    with pytest.raises(MLLPError, match="cannot connect"):
        MLLPClient(HOST, port, timeout=1).connect()
    with pytest.raises(ValueError):
        MLLPClient(HOST, port).send(b"a\x1c\rb")


def test_peer_leaving_mid_frame_or_mid_reply_is_cleaned_up() -> None:
    def big(message: bytes, peer: Peer) -> list[bytes]:
        return [b"R" * 16_000_000] if message == b"BIG" else [reply_for(message)]

    with serve(big) as thread, structlog.testing.capture_logs() as logs:
        with socket.create_connection((HOST, thread.port)) as sock:
            sock.sendall(SB + b"MSH|never finished")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((HOST, thread.port))
            sock.sendall(encode_frame(b"BIG"))
            time.sleep(0.2)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # closed with a reset while the server is still writing 16 MB
        wait_for(lambda: thread.server.connection_count == 0)
        assert_alive(thread.port)
    closed = [entry for entry in logs if entry["event"] == "mllp.connection_closed"]
    assert [entry["reason"] for entry in closed[:2]] == ["closed_mid_frame", "connection_lost_while_writing"]
    assert all(entry["log_level"] == "info" for entry in logs)
    assert all("exc_info" not in entry for entry in logs)
    for entry in closed[:2]:  # one line when it opened, one when it closed: no traceback spam
        assert [e["event"] for e in logs if e.get("peer") == entry["peer"]] == [
            "mllp.connection_opened", "mllp.connection_closed"]


def test_stop_waits_for_running_handler_and_sends_its_reply() -> None:
    started = threading.Event()
    finished = threading.Event()

    def committing(message: bytes, peer: Peer) -> list[bytes]:
        started.set()
        time.sleep(0.5)
        finished.set()
        return [reply_for(message)]

    thread = serve(committing)
    idle = MLLPClient(HOST, thread.port, timeout=5)
    idle.connect()
    wait_for(lambda: thread.server.connection_count == 1)
    busy = MLLPClient(HOST, thread.port, timeout=5)
    busy.send_no_reply(b"in flight")
    assert started.wait(5)
    thread.stop()
    assert finished.is_set()
    assert busy.receive() == reply_for(b"in flight")
    with pytest.raises(MLLPError):
        idle.receive()
    assert thread.server.connection_count == 0
    thread.stop()  # idempotent
    busy.close()


def test_workers_bounds_handler_calls_across_connections() -> None:
    # a connection waits for the one handler slot instead of running beside it
    assert slow_conversations(workers=1, connections=3, messages=30) == 1


def test_threads_are_named_and_joined_on_stop() -> None:
    thread = serve()
    with socket.create_connection((HOST, thread.port), timeout=5) as sock:
        sock.sendall(encode_frame(b"named"))
        assert read_frames(sock, 1) == [reply_for(b"named")]
        name = f"mllp-conn-{sock.getsockname()[1]}"
        threads = {t.name: t for t in threading.enumerate()}
        assert threads[name].daemon
        assert threads["mllp-accept"].daemon
        thread.stop()
    assert name not in {t.name for t in threading.enumerate()}


def test_accept_thread_survives_a_burst_of_resetting_connections() -> None:
    def reset_at_once(payload: bytes) -> None:
        with socket.create_connection((HOST, thread.port), timeout=5) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if payload:
                sock.sendall(payload)

    payloads = [b"", SB + b"MSH|half", encode_frame(b"MSH|whole") + SB] * 40
    with serve(max_connections=5) as thread, structlog.testing.capture_logs() as logs, \
            ThreadPoolExecutor(8) as pool:
        list(pool.map(reset_at_once, payloads))  # more at once than max_connections: some are refused
        wait_for(lambda: thread.server.connection_count == 0)
        assert_alive(thread.port)
        assert_alive(thread.port)
    events = [entry["event"] for entry in logs]
    assert "mllp.accept_failed" not in events
    assert "mllp.connection_failed" not in events
    assert all("exc_info" not in entry for entry in logs)


def big_reply(message: bytes, peer: Peer) -> list[bytes]:
    return [b"R" * 16_000_000] if message == b"BIG" else [reply_for(message)]


def stalled_reader(port: int) -> socket.socket:
    """A connection that asks for a reply far larger than the socket buffers and never reads it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((HOST, port))
    sock.sendall(encode_frame(b"BIG"))
    return sock


def test_peer_that_does_not_read_its_replies_times_out() -> None:
    with serve(big_reply, idle_timeout=0.5) as thread, structlog.testing.capture_logs() as logs, \
            stalled_reader(thread.port):
        started = time.monotonic()
        wait_for(lambda: any(entry["event"] == "mllp.connection_closed" for entry in logs))
        assert time.monotonic() - started < 3
        assert_alive(thread.port)
    closed = [entry for entry in logs if entry["event"] == "mllp.connection_closed"]
    assert closed[0]["reason"] == "write_timeout"


def test_stop_aborts_a_connection_stuck_writing_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("broker.hl7.mllp.STOP_GRACE", 0.3)
    with structlog.testing.capture_logs() as logs:
        thread = serve(big_reply, idle_timeout=60)
        with stalled_reader(thread.port):
            wait_for(lambda: any(entry["event"] == "mllp.connection_opened" for entry in logs))
            time.sleep(0.2)  # the server is blocked writing 16 MB
            started = time.monotonic()
            thread.stop()
            assert time.monotonic() - started < 3
    assert thread.server.connection_count == 0
    closed = [entry for entry in logs if entry["event"] == "mllp.connection_closed"]
    assert [entry["reason"] for entry in closed] == ["connection_lost_while_writing"]
    assert [entry["event"] for entry in logs][-1] == "mllp.stopped"


def test_asyncio_start_serve_forever_and_stop() -> None:
    async def scenario() -> None:
        server = MLLPServer(handler, host=HOST, port=0)
        await server.start()
        with pytest.raises(OSError):  # EADDRINUSE surfaces from start(), not later
            await MLLPServer(handler, host=HOST, port=server.port).start()
        serving = asyncio.create_task(server.serve_forever())
        reply = await asyncio.to_thread(MLLPClient(HOST, server.port, timeout=5).send, b"async")
        assert reply == reply_for(b"async")
        assert not serving.done()
        await server.stop()
        await asyncio.wait_for(serving, timeout=5)
        await server.stop()  # idempotent

    asyncio.run(scenario())


def test_logs_name_events_but_never_contents(server: ServerThread) -> None:
    secret = b"MSH|^~\\&|RIS|H|||ORM^O01|1|P|2.5.1\rPID|1||SECRET-MRN||DOE^JANE\r"
    with structlog.testing.capture_logs() as logs:
        with socket.create_connection((HOST, server.port), timeout=5) as sock:
            sock.sendall(b"SECRET-JUNK" + encode_frame(secret))
            assert read_frames(sock, 1) == [reply_for(secret)]
            sock.sendall(b"SECRET-JUNK")
            sock.sendall(encode_frame(b"!SECRET-FAIL"))
            assert read_frames(sock, 1) == [garbled(b"!SECRET-FAIL")]
        wait_for(lambda: any(entry["event"] == "mllp.connection_closed" for entry in logs))
    events = [entry["event"] for entry in logs]
    assert events.count("mllp.junk_discarded") == 1
    assert "mllp.handler_failed" in events
    assert "SECRET" not in repr(logs)


# --- property test: nothing a peer sends can hang or kill the listener ---

FUZZ_LIMIT = 256


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerThread]:
    with serve(garbled_reply=garbled, idle_timeout=0.5, max_message_bytes=FUZZ_LIMIT, workers=4) as thread:
        yield thread


clean = st.binary(max_size=40).map(lambda b: b.replace(SB, b"").replace(EB, b""))
piece = st.one_of(
    st.binary(max_size=30),
    st.sampled_from([SB, EB, CR, EB + CR, SB + EB + CR, b"\r\n"]),
    clean.map(lambda content: SB + b"MSH|" + content + EB + CR),
    clean.map(lambda content: SB + b"!" + content + EB + CR),
    st.binary(max_size=40).map(lambda content: SB + content + EB + CR),
    st.binary(min_size=FUZZ_LIMIT - 8, max_size=FUZZ_LIMIT + 8).map(lambda content: SB + content + EB + CR),
)


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(piece, max_size=20), half_close=st.sampled_from([True] * 9 + [False]))
def test_arbitrary_bytes_never_hang_or_kill_the_server(
        fuzz_server: ServerThread, parts: list[bytes], half_close: bool) -> None:
    stream = b"".join(parts)
    frames, too_large = reference(stream, FUZZ_LIMIT)
    expected = [expected_reply(frame) for frame in frames]
    with socket.create_connection((HOST, fuzz_server.port), timeout=5) as sock:
        try:
            for part in parts:
                sock.sendall(part)
            if half_close:
                sock.shutdown(socket.SHUT_WR)  # EOF after the data: the server answers, then closes
        except OSError:  # EPIPE, ECONNRESET, ENOTCONN
            assert too_large  # only an oversize frame makes the server hang up while we still write
        replies, how = read_to_close(sock, timeout=5)
    if too_large:
        assert replies == expected[:len(replies)]
    else:
        assert (replies, how) == (expected, "eof")
    assert_alive(fuzz_server.port)


# --- hand_off and adopt: the two halves that intake processes (BROKER_HL7_PROCESSES) use -------------------

def wait_until(condition: Callable[[], bool], seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_hand_off_and_adopt_serve_the_connection_elsewhere_counted_until_released() -> None:
    """A listener with ``hand_off`` serves nothing itself and counts each connection it handed on until
    released; a server that never listens serves them with :meth:`MLLPServer.adopt` and reports each
    closed one. Here both are in one process, and a ``dup`` stands in for passing the descriptor."""
    counted: list[tuple[bytes, list[bytes] | None]] = []
    adopter = MLLPServer(handler, count_message=lambda raw, replies: counted.append((raw, replies)))

    def hand_off(sock: socket.socket, peer: Peer, release: Callable[[], None], *, tls: bool) -> None:
        assert peer[0] == HOST and not tls
        adopter.adopt(sock.dup(), on_close=release)

    with run_in_thread(MLLPServer(None, host=HOST, port=0, max_connections=2, hand_off=hand_off)) as listener:
        first, second = MLLPClient(HOST, listener.port), MLLPClient(HOST, listener.port)
        assert first.send(b"MSH|one") == reply_for(b"MSH|one")
        assert second.send(b"MSH|two") == reply_for(b"MSH|two")
        assert listener.server.connection_count == 2 and adopter.connection_count == 2
        with socket.create_connection((HOST, listener.port), timeout=5) as third:  # past max_connections
            assert read_to_close(third, timeout=5)[0] == []
        first.close()
        wait_until(lambda: listener.server.connection_count == 1)  # released when the adopter closed it
        with MLLPClient(HOST, listener.port) as fourth:
            assert fourth.send(b"MSH|four") == reply_for(b"MSH|four")
        second.close()
        wait_until(lambda: listener.server.connection_count == 0)
    adopter.shutdown()
    assert [raw for raw, _ in counted] == [b"MSH|one", b"MSH|two", b"MSH|four"]


def test_an_adopted_connection_is_closed_gracefully_by_shutdown() -> None:
    """``shutdown`` of a server that only adopts: an idle connection is closed and reported at once."""
    closed = threading.Event()
    adopter = MLLPServer(handler)
    with socket.create_server((HOST, 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2], timeout=5)
        accepted, _ = listener.accept()
        adopter.adopt(accepted, on_close=closed.set)
        client.sendall(encode_frame(b"MSH|x"))
        decoder = FrameDecoder(1 << 20)
        assert decoder.feed(client.recv(65536)) == [reply_for(b"MSH|x")]
        adopter.shutdown()
        assert closed.is_set()
        assert read_to_close(client, timeout=5) == ([], "eof")
        client.close()


def test_a_server_needs_a_handler_or_a_hand_off() -> None:
    with pytest.raises(ValueError):
        MLLPServer(None)
    with pytest.raises(ValueError):
        MLLPServer(handler, hand_off=lambda sock, peer, release: None)
