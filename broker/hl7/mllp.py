"""MLLP (HL7 Minimal Lower Layer Protocol) listener: ``0x0B <message> 0x1C 0x0D`` frames over TCP.

Design choices, and why:

* Messages stay ``bytes`` end to end. The character set is only known after MSH-18 has been read, so
  decoding here would corrupt every message that is not in the guessed charset.
* One asyncio task per connection reads frames and hands each one to the *synchronous* handler in a
  shared thread pool, awaiting it before the next frame. The handler commits to the database and its
  reply must go out before the next message of the same sender is looked at: HL7 senders rely on strict
  in-order processing per connection, while different connections must not wait for each other.
* The frame parser (:class:`FrameDecoder`) is a pure class without I/O, so its corner cases (junk,
  restarts, split terminators, oversize frames) are tested directly and are independent of how TCP
  happens to split the stream.
* A misbehaving peer (garbage, huge frames, silence, a reset) only ever ends its own connection. Nothing
  a peer sends can stop the listener; unexpected errors are logged and close just that connection.
* Logs carry peers, sizes and event names, never message contents (they hold patient data).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from broker.web.metrics import count_hl7_message  # Prometheus (issue 6); imports no web stack

log = structlog.get_logger(__name__)

Peer = tuple[str, int]
"""Remote host and port of a connection."""

MessageHandler = Callable[[bytes, Peer], list[bytes]]
"""Synchronous (blocking) handler: one unframed message in, 0..n unframed replies out, in sending order."""

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
TERMINATOR = b"\x1c\r"
_END_BLOCK_BYTE = 0x1C

READ_CHUNK = 64 * 1024
"""Bytes asked for per read; bounds what one read can buffer on top of the frame being assembled."""

STOP_GRACE = 5.0
"""Seconds :meth:`MLLPServer.stop` gives connections that are writing a reply (not those in the handler)."""


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
        (every one a restart) cannot make a read quadratic and stall the event loop for everyone.
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


class _Phase(enum.Enum):
    """What a connection is doing; :meth:`MLLPServer.stop` treats each phase differently."""

    READING = "reading"
    HANDLING = "handling"
    WRITING = "writing"


class _Close(Exception):
    """Ends one connection with a reason for the log line (never escapes the connection task)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class _Connection:
    """Book-keeping for one accepted connection."""

    peer: Peer
    writer: asyncio.StreamWriter
    task: asyncio.Task[Any] | None
    decoder: FrameDecoder
    log: Any
    phase: _Phase = _Phase.READING
    messages: int = 0
    bytes_in: int = 0
    junk_logged: bool = False
    abandoned_logged: int = 0
    abandoned_bytes_logged: int = 0


def _peer_of(writer: asyncio.StreamWriter) -> Peer:
    """The remote address as ``(host, port)``, also for IPv6 (4-tuples) and already closed sockets."""
    address = writer.get_extra_info("peername")
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return "?", 0


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    """Disable Nagle: a reply is one small write that the sender waits for before its next message."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MLLPServer:
    """Asyncio MLLP listener that passes each received message to a blocking handler in a thread pool.

    ``garbled_reply`` builds the answer for a frame the handler could not deal with (it raised) and for
    an empty frame; without it such a connection is closed (a handler failure) or the frame ignored
    (an empty frame), so the sender, which got no ACK, sends again later.
    """

    def __init__(self, handler: MessageHandler, *, host: str = "0.0.0.0", port: int = 2575,
                 max_message_bytes: int = 4 * 1024 * 1024, idle_timeout: float = 600.0,
                 max_connections: int = 200, workers: int = 8,
                 garbled_reply: Callable[[bytes], bytes] | None = None) -> None:
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
        self._server: asyncio.Server | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._port: int | None = None
        self._connections: set[_Connection] = set()
        self._closing = False
        self._stopped: asyncio.Event | None = None

    @property
    def port(self) -> int:
        """The bound port (the one picked by the OS when constructed with ``port=0``).

        A host name resolving to several addresses binds several sockets; with ``port=0`` each gets
        its own port and this is the first one's. Use an address (the default ``0.0.0.0``) to avoid it.
        """
        if self._port is None:
            raise RuntimeError("the MLLP server has not been started")
        return self._port

    @property
    def connection_count(self) -> int:
        """Connections currently open (refused ones are never counted)."""
        return len(self._connections)

    async def start(self) -> None:
        """Bind and start accepting; returns once the port is bound (errors such as EADDRINUSE raise)."""
        if self._server is not None:
            raise RuntimeError("the MLLP server is already started")
        self._closing = False
        self._stopped = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="mllp-handler")
        try:
            self._server = await asyncio.start_server(
                self._on_connection, self._host, self._requested_port,
                backlog=max(100, self._max_connections), reuse_address=True)
        except BaseException:
            self._pool.shutdown(wait=False)
            self._pool = None
            raise
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.info("mllp.listening", host=self._host, port=self._port, workers=self._workers,
                 max_connections=self._max_connections, max_message_bytes=self._max_message_bytes,
                 idle_timeout=self._idle_timeout)

    async def serve_forever(self) -> None:
        """Serve until :meth:`stop` has finished (starting first if needed)."""
        if self._server is None:
            await self.start()
        assert self._stopped is not None
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop accepting, close the connections, let running handler calls finish, shut the pool.

        A handler call is never abandoned: it may be committing a message, and its reply is still sent
        if the peer is reading. Idle connections are closed at once; connections stuck writing to a
        peer that does not read are aborted after :data:`STOP_GRACE` seconds.
        """
        if self._server is None or self._closing:
            if self._stopped is not None:
                await self._stopped.wait()
            return
        self._closing = True
        self._server.close()
        log.info("mllp.stopping", connections=len(self._connections))
        for conn in list(self._connections):
            if conn.phase is _Phase.READING:
                conn.writer.close()  # the read sees EOF and the connection task ends
        while self._connections:
            tasks = {conn.task for conn in self._connections if conn.task is not None}
            if tasks:
                await asyncio.wait(tasks, timeout=STOP_GRACE)
            else:
                await asyncio.sleep(0.05)
            for conn in list(self._connections):
                if conn.phase is not _Phase.HANDLING:
                    conn.writer.transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_GRACE):
                await self._server.wait_closed()
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, wait=True)
            self._pool = None
        log.info("mllp.stopped", port=self._port)
        assert self._stopped is not None
        self._stopped.set()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Connection task: refuse past the limit, else serve until EOF, error, timeout or stop."""
        peer = _peer_of(writer)
        peer_text = f"{peer[0]}:{peer[1]}"
        if self._closing or len(self._connections) >= self._max_connections:
            log.warning("mllp.connection_refused", peer=peer_text,
                        reason="stopping" if self._closing else "max_connections",
                        connections=len(self._connections), max_connections=self._max_connections)
            writer.transport.abort()
            return
        _set_nodelay(writer)
        conn = _Connection(peer=peer, writer=writer, task=asyncio.current_task(),
                           decoder=FrameDecoder(self._max_message_bytes), log=log.bind(peer=peer_text))
        self._connections.add(conn)
        conn.log.info("mllp.connection_opened", connections=len(self._connections))
        reason = "server_stopping"
        error: str | None = None
        try:
            reason = await self._serve(conn, reader)
        except _Close as close:
            reason = close.reason
        except (ConnectionError, OSError) as exc:
            # A peer that resets mid-frame or mid-reply is routine on hospital networks: one line, no trace.
            reason = f"connection_lost_while_{conn.phase.value}"
            error = type(exc).__name__
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        except Exception:
            reason = "internal_error"
            conn.log.exception("mllp.connection_failed")
        finally:
            self._connections.discard(conn)
            conn.log.info("mllp.connection_closed", reason=reason, error=error, messages=conn.messages,
                          bytes=conn.bytes_in, junk_bytes=conn.decoder.junk_bytes,
                          abandoned_frames=conn.decoder.abandoned_frames,
                          partial_bytes=conn.decoder.pending_bytes, connections=len(self._connections))
            await self._close_writer(writer)

    async def _close_writer(self, writer: asyncio.StreamWriter) -> None:
        """Close gracefully (flushing what is queued) but never wait on a peer that stopped reading."""
        writer.close()
        try:
            async with asyncio.timeout(STOP_GRACE):
                await writer.wait_closed()
        except (Exception, asyncio.CancelledError):
            writer.transport.abort()

    async def _serve(self, conn: _Connection, reader: asyncio.StreamReader) -> str:
        """Read, decode and answer frames in order; returns why the connection ended."""
        while not self._closing:
            conn.phase = _Phase.READING
            try:
                async with asyncio.timeout(self._idle_timeout):
                    data = await reader.read(READ_CHUNK)
            except TimeoutError:
                return "idle_timeout"
            if not data:
                if self._closing:
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
                if self._closing:
                    return "server_stopping"
                await self._answer(conn, message)
            if too_large is not None:
                return "frame_too_large"
        return "server_stopping"

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

    async def _answer(self, conn: _Connection, message: bytes) -> None:
        """Run the handler for one message and send its replies; raise :class:`_Close` to hang up."""
        conn.messages += 1
        if not message:
            if self._garbled_reply is None:
                conn.log.info("mllp.empty_frame_ignored")
                return
            conn.log.info("mllp.empty_frame")
            replies = [self._garbled(conn, message)]
        else:
            conn.phase = _Phase.HANDLING
            try:
                assert self._pool is not None
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._pool, self._handler, message, conn.peer)
                replies = self._checked_replies(result)
            except asyncio.CancelledError:
                raise
            except Exception:
                conn.log.exception("mllp.handler_failed", bytes=len(message))
                count_hl7_message(message, None)
                if self._garbled_reply is None:
                    raise _Close("handler_failed") from None
                replies = [self._garbled(conn, message)]
            else:
                count_hl7_message(message, replies)
        await self._write(conn, replies)

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

    async def _write(self, conn: _Connection, replies: list[bytes]) -> None:
        """Send all replies of one message in one write; a peer that stops reading times out."""
        if not replies:
            return
        conn.phase = _Phase.WRITING
        conn.writer.write(b"".join(encode_frame(reply) for reply in replies))
        try:
            async with asyncio.timeout(self._idle_timeout):
                await conn.writer.drain()
        except TimeoutError:
            raise _Close("write_timeout") from None


class ServerThread:
    """An :class:`MLLPServer` running on its own event loop in a daemon thread (tests, benchmarks)."""

    def __init__(self, server: MLLPServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="mllp-server", daemon=True)
        self._stopped = False

    @property
    def port(self) -> int:
        """The port the server is bound to."""
        return self.server.port

    def _run(self) -> None:
        """Thread body: run the loop until :meth:`stop`, then finish what is left and close it."""
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, None], timeout: float | None = None) -> None:
        """Run ``coroutine`` on the server's loop and wait for it from the calling thread."""
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self) -> None:
        """Start the loop thread and bind the server; raises (and cleans up) if binding fails."""
        self._thread.start()
        try:
            self._call(self.server.start(), timeout=30)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._stopped = True
            raise

    def stop(self) -> None:
        """Stop the server (waiting for running handler calls), then the loop; joins the thread."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._call(self.server.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_in_thread(server: MLLPServer) -> ServerThread:
    """Start ``server`` on an event loop in a daemon thread; returns once it is bound."""
    thread = ServerThread(server)
    thread.start()
    return thread
