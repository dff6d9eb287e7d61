"""Running the application on uvicorn: inside ``broker run`` (a task on its event loop) or alone
(``broker web``).

The listening socket is bound here, not by uvicorn, so a port in use is one clear error for the
caller (uvicorn would exit the process), and uvicorn's own signal handling is turned off: the
runtime owns SIGINT/SIGTERM and stops the server with the rest of the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import structlog
import uvicorn

from broker.config import Settings, StartupError
from broker.store.session import make_engine

log = structlog.get_logger(__name__)
GRACEFUL_SECONDS = 3  # open streams (the board's SSE) are cut after this on stop


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the broker's runtime decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebServer:
    """The HTTP server of the broker, started and stopped on the running event loop."""

    def __init__(self, settings: Settings) -> None:
        from broker.web.app import create_app

        self.settings = settings
        self.engine = make_engine(settings.database_url, pool_size=5, for_reading=True)
        self.write_engine = make_engine(settings.database_url, pool_size=2)
        self.app = create_app(settings, self.engine, write_engine=self.write_engine)
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        """Bind and start serving; raises OSError when the address cannot be bound."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.settings.http_host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.http_host, self.settings.http_port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=GRACEFUL_SECONDS, proxy_headers=False)
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="web-server")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.02)
        log.info("web.started", host=self.settings.http_host, port=self.port,
                 tokens=len(self.settings.api_token_roles))

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        await self.app.state.feed.close()  # ends the SSE streams so the shutdown does not wait on them
        self._server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._task, GRACEFUL_SECONDS + 5)
        self.engine.dispose()
        self.write_engine.dispose()
        log.info("web.stopped")


async def serve_alone(settings: Settings) -> None:
    """``broker web``: only the HTTP server, until SIGINT or SIGTERM."""
    import signal

    from broker.store import migrate

    server = WebServer(settings)
    if not migrate.is_current(server.write_engine):
        raise StartupError("the database schema is not current: run 'broker db upgrade' first")
    try:
        await server.start()
    except OSError as exc:
        raise StartupError(f"cannot listen on HTTP port {settings.http_port}: {exc.strerror}") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


async def start_with_broker(settings: Settings) -> WebServer | None:
    """The HTTP server of ``broker run``; None when ``http_port`` is 0 or the port cannot be bound.

    A port in use does not stop the broker: HL7 and the worklist keep working without the board
    (the error is logged once, naming the port).
    """
    if not settings.http_port:
        return None
    server = WebServer(settings)
    try:
        await server.start()
    except OSError as exc:
        log.error("web.cannot_listen", port=settings.http_port, error=exc.strerror or str(exc))
        server.engine.dispose()
        server.write_engine.dispose()
        return None
    return server
