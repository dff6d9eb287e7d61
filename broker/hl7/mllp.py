"""MLLP (HL7 Minimal Lower Layer Protocol) listener: ``0x0B <message> 0x1C 0x0D`` frames over TCP.

Design choices, and why:

* Messages stay ``bytes`` end to end. The character set is only known after MSH-18 has been read, so
  decoding here would corrupt every message that is not in the guessed charset.
* One thread per connection, with a blocking socket: it reads, decodes, calls the *synchronous*
  handler itself and sends the replies with ``sendall`` before it reads again. The handler commits to
  the database and its reply must go out before the next message of the same sender is looked at: HL7
  senders rely on strict in-order processing per connection, so a connection never has more than one
  message in flight and nothing is gained by handing the call to another thread. The listener used to
  be an asyncio loop passing every message to a thread pool and back (two cross-thread wake-ups per
  message); on a 2-core VM that hand-off alone cost 150-270 us per round trip against ~40 us for a
  thread that reads, handles and writes itself, and the intake has to take 500 messages/s over one
  connection. Connections are few (``max_connections``) and mostly idle, so a thread each is cheap.
* ``workers`` bounds how many handler calls run at once (the intake's database pool is sized by it);
  a connection that finds all of them busy waits, which is the back-pressure a sender expects.
* The frame parser (:class:`FrameDecoder`) is a pure class without I/O, so its corner cases (junk,
  restarts, split terminators, oversize frames) are tested directly and are independent of how TCP
  happens to split the stream.
* A misbehaving peer (garbage, huge frames, silence, a reset) only ever ends its own connection. Nothing
  a peer sends can stop the listener or its accept thread; unexpected errors are logged and close just
  that connection.
* Logs carry peers, sizes and event names, never message contents (they hold patient data).
* With ``hl7_processes`` (:mod:`broker.intake.processes`) one process is not enough for the CPU
  the intake needs, so the same server works in two halves: in the listening process it hands every
  accepted socket to a callable (``hand_off``) that passes it to an intake process, and only counts it
  until it is released; in an intake process a server that does not listen serves those sockets
  (:meth:`MLLPServer.adopt`) with exactly the thread-per-connection code above. Messages never cross a
  process boundary, only connections do.
* TLS (``tls_port`` with a server context from :mod:`broker.tls`) is a second listening port served by
  the same code: the accept thread only wraps the socket (no I/O), and the handshake runs in the
  connection's own thread, bounded by ``handshake_timeout``, so a client that stalls or fails it costs
  only its connection. A failed handshake is logged (``hl7.tls_handshake_failed``, peer and reason) and
  recorded as a Security Alert. Both ports share ``max_connections`` and the handler slots. With
  intake processes the raw TCP socket is handed off with a flag saying it came from the TLS port, and
  the intake process wraps it and does the handshake itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import errno
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from broker.audit.events import NODE_AUTHENTICATION, Source, security_alert
from broker.audit.trail import AuditWriter, broker_participant
from broker.metrics import count_hl7_message  # Prometheus; imports no web stack
from broker.tls import handshake_failure, peer_certificate

log = structlog.get_logger(__name__)

Peer = tuple[str, int]
"""Remote host and port of a connection."""

MessageHandler = Callable[[bytes, Peer], list[bytes]]
"""Synchronous (blocking) handler: one unframed message in, 0..n unframed replies out, in sending order."""

Release = Callable[[], None]
"""Called once when a connection served elsewhere has ended, so that it no longer counts."""



class HandOff(Protocol):
    """Takes an accepted socket to be served elsewhere (the server closes its own copy when this returns)
    and the :data:`Release` to call once that connection has ended; raises if nobody can take it.

    ``tls``: the socket came from the TLS port; it is still the raw TCP socket, the receiver does the
    handshake.
    """

    def __call__(self, sock: socket.socket, peer: Peer, release: Release, *, tls: bool) -> None: ...


MessageCounter = Callable[[bytes, list[bytes] | None], None]
"""Called with each message and its replies (None: none could be given), for the metrics."""

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
TERMINATOR = b"\x1c\r"
_END_BLOCK_BYTE = 0x1C

READ_CHUNK = 64 * 1024
"""Bytes asked for per read; bounds what one read can buffer on top of the frame being assembled."""

STOP_GRACE = 5.0
"""Seconds :meth:`MLLPServer.stop` gives connections that are writing a reply (not those in the handler)."""

ACCEPT_RETRY_DELAY = 1.0
"""Seconds the accept thread pauses after running out of file descriptors or memory (as asyncio does)."""


def encode_frame(message: bytes) -> bytes:
    """Wrap one message in the MLLP start block and end block + carriage return."""
    return START_BLOCK + bytes(message) + TERMINATOR


def unframeable(message: bytes) -> bool:
    """True if ``message`` contains bytes that would end or restart its frame on the wire."""
    return START_BLOCK in message or TERMINATOR in message


class FrameTooLarge(Exception):
    """A frame grew beyond the configured limit; the stream cannot be trusted any further.

    ``frames`` holds the complete frames decoded from the same input before the oversize one, so that
    the caller can still answer them (nothing that arrived intact is lost) before closing.
    """

    def __init__(self, size: int, limit: int, frames: list[bytes]) -> None:
        super().__init__(f"MLLP frame of at least {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit
        self.frames = frames


class FrameDecoder:
    """Incremental MLLP frame parser: feed it bytes as they arrive, get back complete messages.

    Rules (the result never depends on how the input is split into ``feed`` calls):

    * Bytes outside a frame (before a 0x0B) are discarded and counted in :attr:`junk_bytes`.
    * 0x0B inside an unfinished frame discards that frame (counted in :attr:`abandoned_frames` and
      :attr:`abandoned_bytes`) and starts a new one: a sender that restarts is trusted more than the
      half frame it gave up on.
    * Only 0x1C 0x0D ends a frame. A 0x1C followed by anything else is message content; a 0x1C at the
      end of the input may be the first half of the terminator, so the decision waits for more data.
    * A frame whose content exceeds ``max_message_bytes`` raises :class:`FrameTooLarge` (also when it
      is abandoned by a restart), so memory per connection stays bounded. The decoder stays failed.
    """

    def __init__(self, max_message_bytes: int) -> None:
        if max_message_bytes < 0:
            raise ValueError("max_message_bytes must not be negative")
        self.max_message_bytes = max_message_bytes
        self.junk_bytes = 0
        self.abandoned_frames = 0
        self.abandoned_bytes = 0
        self.frames_decoded = 0
        self._in_frame = False
        self._buffer = bytearray()
        self._failed: FrameTooLarge | None = None

    @property
    def in_frame(self) -> bool:
        """True while a frame has started but not ended (a close now would cut a message)."""
        return self._in_frame

    @property
    def pending_bytes(self) -> int:
        """Bytes of the unfinished frame held so far (possibly including the 0x1C of its terminator)."""
        return len(self._buffer)

    def _check_size(self, size: int, frames: list[bytes], *, last_is_end_block: bool = False) -> None:
        """Raise if a frame's content of ``size`` bytes so far is already certain to exceed the limit.

        In an unfinished frame a trailing 0x1C (``last_is_end_block``) may be the start of the
        terminator, so it does not count yet; this keeps the decision identical whether or not the
        terminator's two bytes arrive in the same read.
        """
        if last_is_end_block:
            size -= 1
        if size > self.max_message_bytes:
            self._in_frame = False
            self._buffer = bytearray()
            self._failed = FrameTooLarge(size, self.max_message_bytes, [])
            raise FrameTooLarge(size, self.max_message_bytes, frames)

    def _complete(self, message: bytes, frames: list[bytes]) -> None:
        """A frame ended: check its size, hand it out and look for the next start block."""
        self._check_size(len(message), frames)
        frames.append(message)
        self.frames_decoded += 1
        self._buffer.clear()
        self._in_frame = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume ``data``; return the messages (unframed) completed by it, in order.

        Work is linear in ``len(data)`` whatever the bytes are: the positions of the next start block
        and the next terminator are searched once and reused until passed, so a flood of start blocks
        (every one a restart) cannot make a read quadratic and hold the CPU (and the GIL) that the
        other connections' threads need.
        """
        if self._failed is not None:
            raise FrameTooLarge(self._failed.size, self._failed.limit, [])
        data = bytes(data)
        frames: list[bytes] = []
        pos = 0
        end = len(data)
        next_start = -2  # cached data.find(START_BLOCK, ...): -2 not searched yet, -1 none left
        next_stop = -2  # cached data.find(TERMINATOR, ...), same convention
        while pos < end:
            if next_start != -1 and next_start < pos:
                next_start = data.find(START_BLOCK, pos)
            if not self._in_frame:
                if next_start < 0:
                    self.junk_bytes += end - pos
                    break
                self.junk_bytes += next_start - pos
                self._in_frame = True
                self._buffer.clear()
                pos = next_start + 1
                continue
            # A terminator split across two reads: the previous read ended with 0x1C.
            if self._buffer and self._buffer[-1] == _END_BLOCK_BYTE and data[pos] == 0x0D:
                self._complete(bytes(self._buffer[:-1]), frames)
                pos += 1
                continue
            if next_stop != -1 and next_stop < pos:
                next_stop = data.find(TERMINATOR, pos)
            if next_stop >= 0 and (next_start < 0 or next_stop < next_start):
                if self._buffer:
                    self._buffer += data[pos:next_stop]
                    self._complete(bytes(self._buffer), frames)
                else:
                    self._complete(data[pos:next_stop], frames)
                pos = next_stop + len(TERMINATOR)
            elif next_start >= 0:
                size = len(self._buffer) + next_start - pos
                tail = data[pos:next_start] or self._buffer  # what the abandoned frame ends with
                self._check_size(size, frames, last_is_end_block=tail[-1:] == END_BLOCK)
                self.abandoned_frames += 1
                self.abandoned_bytes += size
                self._buffer.clear()
                pos = next_start + 1  # still in a frame: the new one
            else:
                self._buffer += data[pos:]
                self._check_size(len(self._buffer), frames,
                                 last_is_end_block=self._buffer[-1] == _END_BLOCK_BYTE)
                break
        return frames


_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_LINGER_RESET = struct.pack("ii", 1, 0)


class _Phase(enum.Enum):
    """What a connection is doing; :meth:`MLLPServer.stop` treats each phase differently."""

    READING = "reading"
    HANDLING = "handling"
    WRITING = "writing"


class _Close(Exception):
    """Ends one connection with a reason for the log line (never escapes the connection thread).

    ``abort`` resets the connection instead of closing it gracefully: for a peer that stopped reading,
    whose unsent reply would otherwise linger in the kernel.
    """

    def __init__(self, reason: str, *, abort: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.abort = abort


@dataclass(eq=False)
class _Connection:
    """Book-keeping for one accepted connection; ``phase`` changes only under the server's lock."""

    peer: Peer
    sock: socket.socket
    decoder: FrameDecoder
    log: Any
    thread: threading.Thread = field(init=False)
    phase: _Phase = _Phase.READING
    messages: int = 0
    bytes_in: int = 0
    junk_logged: bool = False
    abandoned_logged: int = 0
    abandoned_bytes_logged: int = 0
    on_close: Release | None = None
    tls: bool = False
    """Came from the TLS port: ``sock`` is an :class:`ssl.SSLSocket` whose handshake is still to do."""
    secured: bool = False
    """The TLS handshake has completed (a close then sends close_notify)."""


def _peer_of(address: object) -> Peer:
    """The remote address as ``(host, port)``, also for IPv6 (4-tuples) and unexpected shapes."""
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return "?", 0


def _set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle: a reply is one small write that the sender waits for before its next message."""
    with contextlib.suppress(OSError):  # a peer that already reset: the first read will tell
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _reset_on_close(sock: socket.socket) -> None:
    """Make the next ``close`` send a reset and drop unsent data, instead of a graceful FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """Wake the thread blocked in ``recv``/``sendall``/``accept`` on ``sock``; it then closes it.

    Closing the socket from here instead would not wake that thread, and could hand its file
    descriptor number to an unrelated new socket while the thread still uses it. The TCP socket is shut
    down directly, also under a TLS connection: :meth:`ssl.SSLSocket.shutdown` would drop the TLS
    state that the woken thread is still using; its read then sees an end of file. ``SHUT_RD`` wakes a
    reading thread and still lets it send its close_notify.
    """
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, how)


def send_close_notify(sock: socket.socket) -> None:
    """Before closing a TLS connection: send close_notify without waiting for the peer's, then return.

    Tells the peer the connection ended on purpose (a TLS 1.3 peer otherwise reports a truncation).
    Non-blocking: a peer that does not read must not hold the closing thread. Nothing for plain sockets.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return
    with contextlib.suppress(OSError, ValueError):  # SSLWantReadError: its close_notify is not here yet
        sock.settimeout(0)
        sock.unwrap()


def _local_port(sock: socket.socket) -> int | None:
    """The port a connection came in on (also for one accepted by another process), if still known."""
    try:
        return int(sock.getsockname()[1])
    except (OSError, IndexError, TypeError, ValueError):
        return None


def _bind(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` resolves to (as :func:`asyncio.start_server`)."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # else it would also take the IPv4 port bound next to it
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


class MLLPServer:
    """MLLP listener with a thread per connection that calls the blocking handler itself.

    ``garbled_reply`` builds the answer for a frame the handler could not deal with (it raised) and for
    an empty frame; without it such a connection is closed (a handler failure) or the frame ignored
    (an empty frame), so the sender, which got no ACK, sends again later.

    The coroutine methods are for an asyncio caller (:mod:`broker.runtime`); the blocking work runs in
    a helper thread so that the caller's loop never waits on a socket or a handler call.

    Two more ways to use it, for intake processes (:mod:`broker.intake.processes`):

    * ``hand_off`` (with ``handler=None``): accepted sockets are given to it instead of being served
      here. They count towards ``max_connections`` and :attr:`connection_count` until released.
    * :meth:`adopt`, without :meth:`start`: serve a socket accepted by another process.

    ``count_message`` is told about every message answered (or not); by default it counts it in this
    process's Prometheus counter.

    Ports: ``port`` is the plain MLLP port (None: none), ``tls_port`` the port with TLS (None: none;
    it needs ``tls_context``, a server context of :func:`broker.tls.server_context`). Either may be 0
    for a port the OS picks. An adopting server needs ``tls_context`` to serve sockets adopted with
    ``tls=True``. ``audit`` records a failed handshake as a Security Alert naming ``ae_title`` (the
    broker) as the node that refused it.

    The server sets ``OP_IGNORE_UNEXPECTED_EOF`` on ``tls_context``: an end of the TCP stream without
    close_notify is then an ordinary end of input. That is what :meth:`stop` causes to wake a reading
    connection (after which the connection still sends its own close_notify, which OpenSSL refuses on
    a connection it considers failed), and what many HL7 senders do when they hang up. Truncation is
    still seen: a frame without its 0x1C 0x0D is never handled (``closed_mid_frame``).
    """

    def __init__(self, handler: MessageHandler | None, *, host: str = "0.0.0.0", port: int | None = 2575,
                 max_message_bytes: int = 4 * 1024 * 1024, idle_timeout: float = 600.0,
                 max_connections: int = 200, workers: int = 8,
                 garbled_reply: Callable[[bytes], bytes] | None = None, hand_off: HandOff | None = None,
                 count_message: MessageCounter = count_hl7_message, tls_port: int | None = None,
                 tls_context: ssl.SSLContext | None = None, handshake_timeout: float = 10.0,
                 audit: AuditWriter | None = None, ae_title: str = "") -> None:
        if (handler is None) == (hand_off is None):
            raise ValueError("give either a handler or a hand_off")
        if tls_port is not None and tls_context is None:
            raise ValueError("a TLS port needs a TLS context")
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        self._handler = handler
        self._host = host
        self._requested_port = port
        self._max_message_bytes = max_message_bytes
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._workers = workers
        self._garbled_reply = garbled_reply
        self._hand_off = hand_off
        self._count_message = count_message
        self._requested_tls_port = tls_port
        self._tls_context = tls_context
        if tls_context is not None:
            tls_context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
        self._handshake_timeout = handshake_timeout
        self._audit = audit
        self._ae_title = ae_title
        self._handler_slots = threading.BoundedSemaphore(workers)
        self._listeners: list[socket.socket] | None = None
        self._accept_threads: list[threading.Thread] = []
        self._port: int | None = None
        self._tls_port: int | None = None
        # Guards _closing and _connections together with every connection's phase, so that stop()
        # sees each connection either already reading (and wakes it) or not yet (and it sees _closing).
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._handed_off = 0  # connections given to hand_off and not yet released
        self._active = False  # started or adopted a socket: stop() has something to do
        self._closing = threading.Event()
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()

    @property
    def port(self) -> int:
        """The bound plain port (the one picked by the OS when constructed with ``port=0``).

        A host name resolving to several addresses binds several sockets; with ``port=0`` each gets
        its own port and this is the first one's. Use an address (the default ``0.0.0.0``) to avoid it.
        """
        if self._port is None:
            raise RuntimeError("the MLLP server has not been started or has no plain port")
        return self._port

    @property
    def tls_port(self) -> int:
        """The bound TLS port (as :attr:`port`)."""
        if self._tls_port is None:
            raise RuntimeError("the MLLP server has not been started or has no TLS port")
        return self._tls_port

    @property
    def connection_count(self) -> int:
        """Connections currently open, served here or handed off (refused ones are never counted)."""
        return len(self._connections) + self._handed_off

    def adopt(self, sock: socket.socket, on_close: Release | None = None, *, tls: bool = False) -> None:
        """Serve ``sock``, a connection accepted by another process, as if this server had accepted it.

        For a server that does not listen (an intake process). ``on_close`` is called once when the
        connection has ended, also when it is refused (``max_connections``, stopping), so that the
        process that accepted it can stop counting it. ``tls``: it came from the TLS port; the
        handshake is done here, in the connection's thread.
        """
        with self._lock:
            self._active = True
        try:
            peer = _peer_of(sock.getpeername())
        except OSError:  # reset before we got to it: the first read will tell
            peer = ("?", 0)
        try:
            self._admit(sock, peer, on_close, tls=tls)
        except BaseException:  # no connection thread took the socket
            _reset_on_close(sock)
            sock.close()
            if on_close is not None:
                on_close()
            raise

    def shutdown(self) -> None:
        """Blocking :meth:`stop`, for synchronous code (an intake process)."""
        self._stop()

    async def start(self) -> None:
        """Bind and start accepting; returns once the port is bound (errors such as EADDRINUSE raise)."""
        await asyncio.to_thread(self._start)

    async def serve_forever(self) -> None:
        """Serve until :meth:`stop` has finished (starting first if needed)."""
        if self._listeners is None:
            await self.start()
        # Shielded: a cancelled caller must not cancel the future that stop() completes.
        await asyncio.shield(asyncio.wrap_future(self._stopped))

    async def stop(self) -> None:
        """Stop accepting, close the connections, let running handler calls finish.

        A handler call is never abandoned: it may be committing a message, and its reply is still sent
        if the peer is reading. Idle connections are closed at once; connections stuck writing to a
        peer that does not read are aborted after :data:`STOP_GRACE` seconds.
        """
        await asyncio.to_thread(self._stop)

    def _start(self) -> None:
        """Blocking :meth:`start`."""
        if self._listeners is not None:
            raise RuntimeError("the MLLP server is already started")
        backlog = max(100, self._max_connections)
        plain: list[socket.socket] = []
        secure: list[socket.socket] = []
        try:
            if self._requested_port is not None:
                plain = _bind(self._host, self._requested_port, backlog)
            if self._requested_tls_port is not None:
                secure = _bind(self._host, self._requested_tls_port, backlog)
        except BaseException:
            for listener in plain:
                listener.close()
            raise
        self._listeners = plain + secure
        self._port = int(plain[0].getsockname()[1]) if plain else None
        self._tls_port = int(secure[0].getsockname()[1]) if secure else None
        self._active = True
        self._accept_threads = [threading.Thread(target=self._accept_loop, args=(listener, listener in secure),
                                                 name="mllp-accept", daemon=True)
                                for listener in self._listeners]
        for thread in self._accept_threads:
            thread.start()
        if not self._listeners:
            log.info("mllp.no_port")  # hl7_port and hl7_tls_port are both 0: no HL7 listener
            return
        log.info("mllp.listening", host=self._host, port=self._port, tls_port=self._tls_port,
                 workers=self._workers, max_connections=self._max_connections,
                 max_message_bytes=self._max_message_bytes, idle_timeout=self._idle_timeout)

    def _stop(self) -> None:
        """Blocking :meth:`stop`; a second caller waits until the first one has finished."""
        with self._lock:
            if not self._active:
                return
            stopping = not self._closing.is_set()
            self._closing.set()
            connections = list(self._connections)  # complete: nothing is admitted from now on
            for conn in connections:
                if conn.phase is _Phase.READING:
                    # Its recv returns at once and the thread ends (a TLS one after its close_notify).
                    _shutdown(conn.sock, socket.SHUT_RD if conn.tls else socket.SHUT_RDWR)
        if not stopping:
            self._stopped.result()
            return
        log.info("mllp.stopping", connections=len(connections))
        listeners = self._listeners or []  # none in a server that only adopts
        for listener in listeners:
            _shutdown(listener)  # wakes the accept thread (closing alone would not)
        for thread in self._accept_threads:
            thread.join()
        for listener in listeners:
            listener.close()
        self._wait_for(connections)
        log.info("mllp.stopped", port=self._port)
        self._stopped.set_result(None)

    def _wait_for(self, connections: list[_Connection]) -> None:
        """Join the connection threads; abort the ones not in the handler every :data:`STOP_GRACE`."""
        while connections:
            deadline = time.monotonic() + STOP_GRACE
            for conn in connections:
                conn.thread.join(max(0.0, deadline - time.monotonic()))
            with self._lock:
                for conn in connections:
                    if conn in self._connections and conn.phase is not _Phase.HANDLING:
                        _reset_on_close(conn.sock)
                        _shutdown(conn.sock)  # sendall fails at once, the thread closes with a reset
            connections = [conn for conn in connections if conn.thread.is_alive()]

    def _accept_loop(self, listener: socket.socket, tls: bool) -> None:
        """Accept thread: admit connections until :meth:`stop`; no error of one connection ends it.

        ``tls``: the TLS port's listener; the socket is only wrapped here, its handshake is done in the
        connection's thread (or in the intake process it is handed off to).
        """
        while True:
            try:
                sock, address = listener.accept()
            except OSError as exc:
                if self._closing.is_set():
                    return
                log.warning("mllp.accept_failed", error=type(exc).__name__,
                            errno=errno.errorcode.get(exc.errno or 0))
                if exc.errno in _OUT_OF_RESOURCES:
                    self._closing.wait(ACCEPT_RETRY_DELAY)  # connections are waiting in the backlog
                continue
            try:
                if self._hand_off is not None:
                    self._pass_on(sock, _peer_of(address), tls)
                else:
                    self._admit(sock, _peer_of(address), tls=tls)
            except Exception:  # no connection thread (or hand_off) took the socket
                log.exception("mllp.accept_failed")
                _reset_on_close(sock)
                sock.close()

    def _refusal(self) -> str | None:
        """Why a new connection is refused now, or None to admit it; the caller holds the lock."""
        if self._closing.is_set():
            return "stopping"
        if self.connection_count >= self._max_connections:
            return "max_connections"
        return None

    def _admit(self, sock: socket.socket, peer: Peer, on_close: Release | None = None, *,
               tls: bool = False) -> None:
        """Start a connection thread for ``sock``, or reset it past the limit or while stopping.

        ``tls``: wrap it (no I/O here) for the handshake that its thread begins with.
        """
        peer_text = f"{peer[0]}:{peer[1]}"
        if tls:
            if self._tls_context is None:
                raise RuntimeError("a TLS connection came to an MLLP server without a TLS context")
            sock = self._tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        conn = _Connection(peer=peer, sock=sock, decoder=FrameDecoder(self._max_message_bytes),
                           log=log.bind(peer=peer_text), on_close=on_close, tls=tls)
        conn.thread = threading.Thread(target=self._run_connection, args=(conn,),
                                       name=f"mllp-conn-{peer[1]}", daemon=True)
        with self._lock:
            refused = self._refusal()
            if refused is None:
                self._connections.add(conn)
                try:
                    # Started under the lock, so that stop() only ever joins threads that run.
                    conn.thread.start()
                except BaseException:
                    self._connections.discard(conn)
                    raise
                return
            connections = self.connection_count
        self._refuse(sock, peer_text, refused, connections)
        if on_close is not None:
            on_close()

    def _pass_on(self, sock: socket.socket, peer: Peer, tls: bool) -> None:
        """Give ``sock`` to ``hand_off``, counted until released; or reset it past the limit or while stopping.

        Counted before it is handed off, so that a release reported at once cannot come first.
        """
        assert self._hand_off is not None
        with self._lock:
            refused = self._refusal()
            if refused is None:
                self._handed_off += 1
            connections = self.connection_count
        if refused is not None:
            self._refuse(sock, f"{peer[0]}:{peer[1]}", refused, connections)
            return
        release = self._releaser()
        try:
            self._hand_off(sock, peer, release, tls=tls)
        except BaseException:
            release()
            raise
        sock.close()  # the receiver has its own copy of the descriptor

    def _releaser(self) -> Release:
        """A :data:`Release` for one handed-off connection; calls after the first change nothing."""
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._handed_off -= 1

        return release

    def _refuse(self, sock: socket.socket, peer_text: str, reason: str, connections: int) -> None:
        """Log the refusal and reset ``sock``."""
        log.warning("mllp.connection_refused", peer=peer_text, reason=reason,
                    connections=connections, max_connections=self._max_connections)
        # Yield the GIL once: a client in this process (tests, benchmarks) whose connect has completed
        # in the kernel would otherwise see the reset as a failed connect rather than as a refusal.
        time.sleep(0)
        _reset_on_close(sock)
        sock.close()

    def _run_connection(self, conn: _Connection) -> None:
        """Connection thread: serve until EOF, error, timeout or stop, then close and log."""
        conn.log.info("mllp.connection_opened", connections=len(self._connections))
        reason = "internal_error"
        error: str | None = None
        abort = False
        try:
            _set_nodelay(conn.sock)
            if conn.tls:
                self._handshake(conn)
            conn.sock.settimeout(self._idle_timeout)
            reason = self._serve(conn)
        except _Close as close:
            reason = close.reason
            abort = close.abort
        except OSError as exc:
            # A peer that resets mid-frame or mid-reply is routine on hospital networks: one line, no trace.
            reason = f"connection_lost_while_{conn.phase.value}"
            error = type(exc).__name__
        except Exception:
            conn.log.exception("mllp.connection_failed")
        finally:
            if conn.secured and not abort:
                send_close_notify(conn.sock)
            with self._lock:  # stop() only touches sockets of connections in the set
                self._connections.discard(conn)
                connections = len(self._connections)
                if abort:
                    _reset_on_close(conn.sock)
                conn.sock.close()
            conn.log.info("mllp.connection_closed", reason=reason, error=error, messages=conn.messages,
                          bytes=conn.bytes_in, junk_bytes=conn.decoder.junk_bytes,
                          abandoned_frames=conn.decoder.abandoned_frames,
                          partial_bytes=conn.decoder.pending_bytes, connections=connections)
            self._closed(conn)

    def _handshake(self, conn: _Connection) -> None:
        """The TLS handshake of a connection from the TLS port, within ``handshake_timeout`` in all.

        A failure ends only this connection: logged with the peer and the reason, and recorded as a
        Security Alert (node authentication). One cut short by :meth:`stop` is neither, nor is a
        connection closed before its first byte (a port probe, a load balancer's health check).
        """
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        self._enter(conn, _Phase.READING)  # stop() wakes a handshake waiting for the peer as it wakes a read
        deadline = time.monotonic() + self._handshake_timeout
        sock.settimeout(self._handshake_timeout)
        try:
            # A peek at the TCP stream (under the TLS layer): is anything coming at all?
            if not socket.socket.recv(sock, 1, socket.MSG_PEEK):
                raise _Close("closed_before_handshake")
            # CPython bounds the whole handshake by the socket's timeout, not each read.
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError, TimeoutError and resets are OSErrors
            if self._closing.is_set():
                raise _Close("server_stopping") from None
            reason = handshake_failure(exc)
            port = _local_port(sock)
            conn.log.warning("hl7.tls_handshake_failed", reason=reason, port=port)
            self._alert(conn.peer[0], reason, port)
            raise _Close("tls_handshake_failed") from None
        conn.secured = True
        certificate = peer_certificate(sock)
        conn.log.info("hl7.tls_established", version=sock.version(), cipher=(sock.cipher() or ("",))[0],
                      client_certificate=certificate.subject if certificate else None)

    def _alert(self, host: str, reason: str, port: int | None) -> None:
        """Record a refused TLS client as a Security Alert; the audit trail failing never ends anything."""
        if self._audit is None:
            return
        try:
            self._audit.submit(security_alert(
                Source(user_id="unknown", host=host, channel="hl7"), broker_participant(self._ae_title),
                alert=NODE_AUTHENTICATION, reason=reason, resource=f"MLLP port {port}"))
        except Exception:
            log.exception("hl7.audit_failed", event="security_alert")

    @staticmethod
    def _closed(conn: _Connection) -> None:
        """Tell whoever handed the connection over that it has ended; a failure only ends up in the log."""
        if conn.on_close is None:
            return
        try:
            conn.on_close()
        except Exception:
            conn.log.exception("mllp.close_report_failed")

    def _enter(self, conn: _Connection, phase: _Phase) -> None:
        """Move ``conn`` to ``phase``; raise :class:`_Close` instead of reading or handling once stopping.

        Writing always goes ahead: it sends the reply of a message the handler has already taken.
        """
        with self._lock:
            if phase is not _Phase.WRITING and self._closing.is_set():
                raise _Close("server_stopping")
            conn.phase = phase

    def _serve(self, conn: _Connection) -> str:
        """Read, decode and answer frames in order; returns why the connection ended."""
        while True:
            self._enter(conn, _Phase.READING)
            try:
                data = conn.sock.recv(READ_CHUNK)
            except TimeoutError:
                return "idle_timeout"
            if not data:
                if self._closing.is_set():
                    return "server_stopping"
                return "closed_mid_frame" if conn.decoder.in_frame else "peer_closed"
            conn.bytes_in += len(data)
            too_large: FrameTooLarge | None = None
            try:
                frames = conn.decoder.feed(data)
            except FrameTooLarge as exc:
                too_large = exc
                frames = exc.frames
                conn.log.warning("mllp.frame_too_large", bytes=exc.size, max_message_bytes=exc.limit)
            self._log_discards(conn)
            for message in frames:
                self._enter(conn, _Phase.HANDLING)  # a frame decoded after stop() began is not handled
                self._answer(conn, message)
            if too_large is not None:
                return "frame_too_large"

    def _log_discards(self, conn: _Connection) -> None:
        """Warn about discarded bytes without flooding: junk once per connection, restarts per read."""
        decoder = conn.decoder
        if decoder.junk_bytes and not conn.junk_logged:
            conn.junk_logged = True
            conn.log.warning("mllp.junk_discarded", bytes=decoder.junk_bytes)
        if decoder.abandoned_frames > conn.abandoned_logged:
            conn.log.warning("mllp.unfinished_frame_discarded",
                             frames=decoder.abandoned_frames - conn.abandoned_logged,
                             bytes=decoder.abandoned_bytes - conn.abandoned_bytes_logged)
            conn.abandoned_logged = decoder.abandoned_frames
            conn.abandoned_bytes_logged = decoder.abandoned_bytes

    def _answer(self, conn: _Connection, message: bytes) -> None:
        """Run the handler for one message and send its replies; raise :class:`_Close` to hang up."""
        conn.messages += 1
        if not message:
            if self._garbled_reply is None:
                conn.log.info("mllp.empty_frame_ignored")
                return
            conn.log.info("mllp.empty_frame")
            replies = [self._garbled(conn, message)]
        else:
            assert self._handler is not None  # a server with hand_off serves no connection itself
            try:
                with self._handler_slots:
                    result = self._handler(message, conn.peer)
                replies = self._checked_replies(result)
            except Exception:
                conn.log.exception("mllp.handler_failed", bytes=len(message))
                self._count_message(message, None)
                if self._garbled_reply is None:
                    raise _Close("handler_failed") from None
                replies = [self._garbled(conn, message)]
            else:
                self._count_message(message, replies)
        self._write(conn, replies)

    def _garbled(self, conn: _Connection, message: bytes) -> bytes:
        """The configured answer to an unprocessable frame; if even that fails, hang up."""
        assert self._garbled_reply is not None
        try:
            return self._checked_replies([self._garbled_reply(message)])[0]
        except Exception:
            conn.log.exception("mllp.garbled_reply_failed", bytes=len(message))
            raise _Close("garbled_reply_failed") from None

    @staticmethod
    def _checked_replies(result: object) -> list[bytes]:
        """Replies as bytes; anything that cannot be framed is a programming error, not a wire error."""
        if not isinstance(result, list | tuple):
            raise TypeError(f"MLLP handler must return a list of bytes, not {type(result).__name__}")
        replies: list[bytes] = []
        for reply in result:
            if not isinstance(reply, bytes | bytearray | memoryview):
                raise TypeError(f"MLLP reply must be bytes, not {type(reply).__name__}")
            reply = bytes(reply)
            if unframeable(reply):
                raise ValueError("MLLP reply contains a start block or a 0x1C 0x0D terminator")
            replies.append(reply)
        return replies

    def _write(self, conn: _Connection, replies: list[bytes]) -> None:
        """Send all replies of one message in one write; a peer that stops reading times out.

        The socket timeout bounds the whole ``sendall``, not each partial send: a peer gets
        ``idle_timeout`` seconds to take a reply, however large.
        """
        if not replies:
            return
        self._enter(conn, _Phase.WRITING)
        try:
            conn.sock.sendall(b"".join(encode_frame(reply) for reply in replies))
        except TimeoutError:
            raise _Close("write_timeout", abort=True) from None


class ServerThread:
    """An :class:`MLLPServer` started and stopped from synchronous code (tests, benchmarks).

    The server runs in its own accept and connection threads; the name is from when it needed an
    event loop thread, and stays for its callers.
    """

    def __init__(self, server: MLLPServer) -> None:
        self.server = server
        self._stopped = False

    @property
    def port(self) -> int:
        """The port the server is bound to."""
        return self.server.port

    def start(self) -> None:
        """Bind the server and start accepting; raises if binding fails."""
        self.server._start()

    def stop(self) -> None:
        """Stop the server, waiting for running handler calls; safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        self.server._stop()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_in_thread(server: MLLPServer) -> ServerThread:
    """Start ``server`` from synchronous code; returns once it is bound and accepting."""
    thread = ServerThread(server)
    thread.start()
    return thread
