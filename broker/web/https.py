"""HTTPS on uvicorn with the broker's own TLS context, every failed handshake logged and reported.

uvicorn serves TLS through asyncio's ``create_server(ssl=...)``, which drops a failed handshake without
a word (no peer, no reason) and builds its context from its own ``ssl_*`` options. So uvicorn gets
plain listening sockets and, as its HTTP protocol class, :func:`listener_protocol`: a connection on the
plain port goes straight to uvicorn's protocol; on the TLS port the handshake is run here
(``loop.start_tls`` with the context of :func:`broker.tls.server_context` and the handshake timeout),
and uvicorn's protocol gets the connection only once it succeeded. uvicorn then sees a TLS transport
(its ``sslcontext``), so the request's scheme is ``https``.

A failed handshake (no or an untrusted or expired client certificate, TLS 1.1, too slow) is logged as
``web.tls_handshake_failed`` with the peer's address and the reason, reported to ``on_failure`` (the
audit trail's Security Alert) and the connection closed; the listener goes on. A peer that closes
before any TLS error was seen (a port probe, a health check that only connects) is logged as
``web.tls_connection_closed`` at debug level and not reported: nothing was attempted.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, ClassVar

import structlog

from broker.tls import handshake_failure

log = structlog.get_logger(__name__)


class Handshakes:
    """What the TLS port's connections share: the context, the port, the timeout, the failure report,
    and the handshakes still under way (cancelled on stop)."""

    def __init__(self, context: ssl.SSLContext, port: int, timeout: float,
                 on_failure: Callable[[str, str], None] | None = None) -> None:
        self.context = context
        self.port = port
        self.timeout = timeout
        self.on_failure = on_failure
        self.pending: set[asyncio.Task[None]] = set()

    def failed(self, peer: str, exc: BaseException) -> None:
        reason = _reason(exc)
        if reason is None:
            log.debug("web.tls_connection_closed", peer=peer)
            return
        log.warning("web.tls_handshake_failed", peer=peer, port=self.port, reason=reason)
        if self.on_failure is not None:
            try:
                self.on_failure(peer, reason)
            except Exception as report_exc:  # the audit trail's trouble must not stop the listener
                log.error("web.tls_failure_not_reported", error=type(report_exc).__name__)

    def cancel(self) -> None:
        """Stop the handshakes under way (the server is stopping)."""
        for task in list(self.pending):
            task.cancel()


def _reason(exc: BaseException) -> str | None:
    """The reason to log, or None when the peer only closed (no TLS error, no timeout)."""
    if isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc):
        return "handshake not completed in time"  # asyncio's handshake timeout
    if isinstance(exc, ConnectionResetError | BrokenPipeError) and not isinstance(exc, ssl.SSLError):
        return None
    return handshake_failure(exc)


def listener_protocol(inner: type[asyncio.Protocol], handshakes: Handshakes | None) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn (``Config(http=...)``): ``inner`` (uvicorn's HTTP protocol)
    behind a TLS handshake on ``handshakes.port``, directly on any other port."""
    return type("ListenerProtocol", (_ListenerProtocol,), {"inner_class": inner, "handshakes": handshakes})


class _ListenerProtocol(asyncio.Protocol):
    """Plain port: hands the transport to uvicorn's protocol at once. TLS port: runs the handshake,
    keeps what arrives between its end and the hand-over, then hands the TLS transport over."""

    inner_class: ClassVar[type[asyncio.Protocol]]
    handshakes: ClassVar[Handshakes | None]

    def __init__(self, **kwargs: Any) -> None:
        self._inner = self.inner_class(**kwargs)
        self._early: list[bytes] = []
        self._eof = False
        self._lost: list[Exception | None] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        sockname = transport.get_extra_info("sockname")
        handshakes = self.handshakes
        if handshakes is None or not sockname or sockname[1] != handshakes.port:
            transport.set_protocol(self._inner)
            self._inner.connection_made(transport)
            return
        transport.pause_reading()  # nothing may reach this protocol before start_tls takes the socket
        task = asyncio.get_running_loop().create_task(self._handshake(transport, handshakes))
        handshakes.pending.add(task)
        task.add_done_callback(handshakes.pending.discard)

    async def _handshake(self, transport: asyncio.Transport, handshakes: Handshakes) -> None:
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if peername else ""
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(transport, self, handshakes.context, server_side=True,
                                       ssl_handshake_timeout=handshakes.timeout)
        except asyncio.CancelledError:
            transport.abort()
            raise
        except Exception as exc:
            transport.abort()
            handshakes.failed(peer, exc)
            return
        if tls is None:  # the connection was lost as the handshake ended
            transport.abort()
            return
        self._inner.connection_made(tls)
        tls.set_protocol(self._inner)
        for chunk in self._early:
            self._inner.data_received(chunk)
        self._early.clear()
        if self._eof and not self._inner.eof_received():
            tls.close()
        if self._lost:
            self._inner.connection_lost(self._lost[0])

    # While the handshake's end and the hand-over are apart, the TLS transport delivers here.
    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> bool:
        self._eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.append(exc)
