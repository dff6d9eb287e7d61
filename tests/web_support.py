"""The broker's HTTP server (uvicorn) for tests that talk to it as outside clients do, over a real socket:
started as ``broker run`` starts it, on an event loop of its own, here in a thread of the test process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from broker.config import Settings
from broker.web.server import WebServer


class WebServerThread:
    """The broker's WebServer on an event loop of its own thread (as ``broker run`` runs it); started on
    creation, on ``settings``' HTTP port (``server.port`` is the one bound)."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="web", daemon=True)
        self.thread.start()
        self.server = WebServer(settings, own_audit=True)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(20)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextmanager
def web_server(settings: Settings) -> Iterator[WebServerThread]:
    """A :class:`WebServerThread` for the ``with`` block, stopped at its end."""
    web = WebServerThread(settings)
    try:
        yield web
    finally:
        web.stop()
