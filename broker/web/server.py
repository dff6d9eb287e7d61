"""Running the application on uvicorn: inside ``broker run`` (a task on its event loop) or alone
(``broker web``), on the plain port (``http_port``), the HTTPS port (``http_tls_port``) or both.

The listening sockets are bound here, not by uvicorn, so a port in use is one clear error for the
caller (uvicorn would exit the process), and uvicorn's own signal handling is turned off: the
runtime owns SIGINT/SIGTERM and stops the server with the rest of the broker. One uvicorn server
serves both ports (one application, one lifespan); TLS is done by :mod:`broker.web.https` with the
context of :func:`broker.tls.server_context`, not by uvicorn's ``ssl_*`` options.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator

import structlog
import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from broker.audit.trail import AuditWriter
from broker.config import Settings, StartupError
from broker.store.session import make_engine
from broker.tls import server_context
from broker.web.access_audit import handshake_alert
from broker.web.auth import read_tokens_file
from broker.web.https import Handshakes, listener_protocol

log = structlog.get_logger(__name__)
GRACEFUL_SECONDS = 3  # open streams (the board's SSE) are cut after this on stop


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the broker's runtime decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def check(settings: Settings) -> None:
    """What would stop the HTTP server's start, checked before anything else starts: the tokens file's
    lines and the TLS context (certificate and key that belong together). Raises StartupError."""
    if settings.api_tokens_file:
        read_tokens_file(settings.api_tokens_file)
    if settings.http_tls_port:
        _tls_context(settings)


def _tls_context(settings: Settings) -> ssl.SSLContext:
    try:
        return server_context(settings, require_client_cert=settings.http_tls_require_client_cert)
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot use the TLS certificate for HTTPS: {getattr(exc, 'reason', None) or exc}"
                           ) from exc


class WebServer:
    """The HTTP server of the broker, started and stopped on the running event loop.

    ``audit``: the process's audit writer (``broker run``), given to the application; with
    ``own_audit`` (``broker web`` alone) and ``audit_enabled`` the server makes its own on its write
    engine and closes it on stop. Raises StartupError for a bad tokens file or TLS certificate.
    """

    def __init__(self, settings: Settings, audit: AuditWriter | None = None, *, own_audit: bool = False) -> None:
        from broker.web.app import create_app

        self.settings = settings
        self.engine = make_engine(settings.database_url, pool_size=5, for_reading=True)
        self.write_engine = make_engine(settings.database_url, pool_size=2)
        self._own_audit = audit is None and own_audit and settings.audit_enabled
        self.audit = AuditWriter(self.write_engine, settings.audit_flush_interval) if self._own_audit else audit
        self.tls_context = _tls_context(settings) if settings.http_tls_port else None
        self.app = create_app(settings, self.engine, write_engine=self.write_engine, audit=self.audit)
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._handshakes: Handshakes | None = None
        self.port = 0
        self.tls_port = 0

    async def start(self) -> None:
        """Bind and start serving; raises OSError when an address cannot be bound."""
        sockets: list[socket.socket] = []
        try:
            if self.settings.http_port:
                sockets.append(self._bind(self.settings.http_port))
                self.port = sockets[-1].getsockname()[1]
            if self.tls_context is not None:
                sockets.append(self._bind(self.settings.http_tls_port))
                self.tls_port = sockets[-1].getsockname()[1]
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        if self.tls_context is not None:
            self._handshakes = Handshakes(self.tls_context, self.tls_port, self.settings.tls_handshake_timeout,
                                          self._handshake_failed)
        protocol = listener_protocol(import_from_string(HTTP_PROTOCOLS["auto"]), self._handshakes)
        config = uvicorn.Config(self.app, http=protocol, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=GRACEFUL_SECONDS, proxy_headers=False,
                                server_header=False)
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=sockets), name="web-server")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.02)
        log.info("web.started", host=self.settings.http_host, port=self.port or None,
                 tls_port=self.tls_port or None,
                 client_cert_required=bool(self.tls_port) and self.settings.http_tls_require_client_cert,
                 tokens=len(self.app.state.tokens))

    def _bind(self, port: int) -> socket.socket:
        # IPPROTO_TCP, not the default 0: asyncio turns Nagle off only on sockets whose proto says TCP, and
        # accepted sockets inherit the listener's. With Nagle on, uvicorn's two writes of a response (head,
        # then body) waited for the client's delayed ACK: ~40 ms on every response.
        sock = socket.socket(socket.AF_INET6 if ":" in self.settings.http_host else socket.AF_INET,
                             socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.http_host, port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def _handshake_failed(self, peer: str, reason: str) -> None:
        if self.audit is not None:
            broker = self.app.state.broker_participant()
            self.audit.submit(handshake_alert(broker, peer, reason, self.tls_port))

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            await self.app.state.feed.close()  # ends the SSE streams so the shutdown does not wait on them
            if self._handshakes is not None:
                self._handshakes.cancel()
            self._server.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, GRACEFUL_SECONDS + 5)
            log.info("web.stopped")
        self.close()

    def close(self) -> None:
        """Release the engines (and the server's own audit writer, flushed first)."""
        if self._own_audit and self.audit is not None:
            self.audit.close()
            self.audit = None
        self.engine.dispose()
        self.write_engine.dispose()


async def serve_alone(settings: Settings) -> None:
    """``broker web``: only the HTTP server, until SIGINT or SIGTERM."""
    import signal

    from broker.store import migrate

    if not settings.http_port and not settings.http_tls_port:
        raise StartupError("BROKER_HTTP_PORT and BROKER_HTTP_TLS_PORT are both 0: no HTTP listener")
    check(settings)
    probe = make_engine(settings.database_url, pool_size=1)
    try:
        if not migrate.is_current(probe):
            raise StartupError("the database schema is not current: run 'broker db upgrade' first")
    finally:
        probe.dispose()
    server = WebServer(settings, own_audit=True)
    try:
        await server.start()
    except OSError as exc:
        server.close()
        ports = " / ".join(str(p) for p in (settings.http_port, settings.http_tls_port) if p)
        raise StartupError(f"cannot listen on HTTP port {ports}: {exc.strerror}") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


async def start_with_broker(settings: Settings, audit: AuditWriter | None = None) -> WebServer | None:
    """The HTTP server of ``broker run``; None when ``http_port`` and ``http_tls_port`` are 0 or a port
    cannot be bound. ``audit``: the process's audit writer.

    A port in use does not stop the broker: HL7 and the worklist keep working without the board
    (the error is logged once, naming the port). A bad tokens file or certificate does: call
    :func:`check` before the other listeners start.
    """
    if not settings.http_port and not settings.http_tls_port:
        return None
    server = WebServer(settings, audit)
    try:
        await server.start()
    except OSError as exc:
        log.error("web.cannot_listen", port=settings.http_port or None, tls_port=settings.http_tls_port or None,
                  error=exc.strerror or str(exc))
        server.close()
        return None
    return server
