"""Blocking MLLP client: one persistent TCP connection, one message at a time.

Kept synchronous on purpose: its users (tests, benchmarks, and the sender of HL7 status messages to
the RIS, which runs in a worker) send a message and wait for its ACK before doing anything else.
Every failure of the connection surfaces as :class:`MLLPError`, and the connection is dropped, so a
late reply to one message can never be mistaken for the reply to the next; the next call connects anew.

With an ``ssl_context`` (for the RIS: :func:`broker.tls.client_context`, which verifies the server's
certificate and presents the broker's) the connection is TLS; the handshake is part of connecting, so a
server whose certificate is not accepted is an :class:`MLLPError` like a refused connection.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

from broker.hl7.mllp import FrameDecoder, FrameTooLarge, encode_frame, send_close_notify, unframeable
from broker.tls import handshake_failure

RECV_CHUNK = 64 * 1024


class MLLPError(Exception):
    """The connection failed, was closed before a reply arrived, or no reply came in time."""


class MLLPClient:
    """Blocking persistent MLLP connection.

    Used by tests, benchmarks and for HL7 status messages to the RIS.
    ``send`` connects on first use (and again after a failure dropped the connection).
    ``ssl_context``: connect with TLS; ``server_hostname`` (default ``host``) is the name the server's
    certificate must carry when the context checks host names.
    """

    def __init__(self, host: str, port: int, timeout: float = 30.0, *,
                 max_message_bytes: int = 64 * 1024 * 1024, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder(max_message_bytes)
        self._received: list[bytes] = []

    @property
    def connected(self) -> bool:
        """True while a connection is open (it is dropped after any error)."""
        return self._sock is not None

    def connect(self) -> None:
        """Open the connection (no-op if already open); raises :class:`MLLPError` if it cannot."""
        if self._sock is not None:
            return
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise MLLPError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            try:  # the handshake happens here, within the timeout set on the socket
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_hostname)
            except (OSError, ValueError) as exc:
                sock.close()
                raise MLLPError(f"TLS handshake with {self.host}:{self.port} failed: "
                                f"{handshake_failure(exc)}") from exc
        self._sock = sock
        self._decoder = FrameDecoder(self.max_message_bytes)
        self._received = []

    def send(self, message: bytes) -> bytes:
        """Frame and send ``message``, then wait for one reply frame and return it unframed."""
        self.send_no_reply(message)
        return self.receive()

    def send_no_reply(self, message: bytes) -> None:
        """Frame and send ``message`` without waiting for anything (connecting first if needed).

        Raises :class:`ValueError` for a message that cannot be framed (it contains 0x0B or 0x1C 0x0D):
        the receiver would cut it into pieces.
        """
        if unframeable(message):
            raise ValueError("an MLLP message must not contain 0x0B or 0x1C 0x0D")
        self.connect()
        assert self._sock is not None
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(encode_frame(message))
        except OSError as exc:
            self.close()
            raise MLLPError(f"sending to {self.host}:{self.port} failed: {exc}") from exc

    def receive(self) -> bytes:
        """Return the next reply frame, unframed, waiting at most ``timeout`` seconds for it."""
        if self._received:
            return self._received.pop(0)
        if self._sock is None:
            raise MLLPError("not connected")
        deadline = time.monotonic() + self.timeout
        while not self._received:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise MLLPError(f"no reply from {self.host}:{self.port} within {self.timeout} s")
            try:
                self._sock.settimeout(remaining)
                data = self._sock.recv(RECV_CHUNK)
            except TimeoutError as exc:
                self.close()
                raise MLLPError(f"no reply from {self.host}:{self.port} within {self.timeout} s") from exc
            except OSError as exc:
                self.close()
                raise MLLPError(f"connection to {self.host}:{self.port} failed: {exc}") from exc
            if not data:
                self.close()
                raise MLLPError(f"{self.host}:{self.port} closed the connection before replying")
            try:
                self._received.extend(self._decoder.feed(data))
            except FrameTooLarge as exc:
                self.close()
                raise MLLPError(f"reply from {self.host}:{self.port} too large: {exc}") from exc
        return self._received.pop(0)

    def close(self) -> None:
        """Close the connection; safe to call more than once."""
        sock, self._sock = self._sock, None
        if sock is not None:
            send_close_notify(sock)
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> MLLPClient:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
