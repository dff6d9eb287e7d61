"""``create_app``: the FastAPI application of the broker: REST API (OpenAPI at ``/openapi.json``), health,
metrics and the status board."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine

from broker import __version__
from broker.config import Settings
from broker.intake.service import Intake
from broker.metrics import exposition
from broker.web import board, events, health, messages, procedures, steps
from broker.web.auth import ReadAccess, TokenBook
from broker.web.live import LiveFeed

DESCRIPTION = """The worklist broker's REST API and department status board.

Every data route needs an API token (setting `api_tokens`, `token:role` with role `read` or `write`),
sent as `Authorization: Bearer <token>`; changes need the write role. `/healthz` and `/readyz` need none.
"""


def create_app(settings: Settings, engine: Engine, *, intake: Intake | None = None,
               write_engine: Engine | None = None, live_interval: float = 0.5) -> FastAPI:
    """The application on ``engine`` (reads). Create / change / cancel and replay go through ``intake``,
    built on first use from ``write_engine`` (default ``engine``) and the mapping files when not given."""

    feed = LiveFeed(engine, live_interval)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await feed.close()

    # No /docs or /redoc: FastAPI's pages load Swagger UI / ReDoc from a CDN, and the hospital network
    # has no internet. /openapi.json is served; any OpenAPI viewer can read it.
    app = FastAPI(title="Worklist broker", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.engine = engine
    app.state.tokens = TokenBook(settings.api_token_roles)
    app.state.feed = feed
    app.state.intake = _intake_factory(settings, write_engine or engine, intake)
    for module in (health, procedures, steps, messages, events, board):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=board.STATIC), name="static")

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (text exposition format)",
             responses={200: {"content": {"text/plain": {}}}})
    def metrics(request: Request, _: ReadAccess) -> Response:
        body, content_type = exposition(request.app.state.engine)
        return Response(body, media_type=content_type)

    return app


def _intake_factory(settings: Settings, engine: Engine, given: Intake | None) -> Callable[[], Intake]:
    lock = threading.Lock()
    made: list[Intake] = [given] if given is not None else []

    def intake() -> Intake:
        with lock:
            if not made:
                from broker.mapping.rules import load_mappings

                made.append(Intake(engine, load_mappings(settings.mappings_dir), settings.uid_root))
            return made[0]

    return intake
