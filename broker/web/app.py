"""``create_app``: the FastAPI application of the broker: REST API (OpenAPI at ``/openapi.json``), health,
metrics and the status board."""

from __future__ import annotations

import functools
import threading
import unicodedata
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine
from starlette.types import ASGIApp, Receive, Scope, Send

from broker import __version__
from broker.audit.events import Participant
from broker.audit.trail import AuditWriter, broker_participant
from broker.config import Settings
from broker.intake.service import Intake
from broker.metrics import exposition
from broker.web import audit as audit_trail
from broker.web import board, events, health, messages, procedures, steps
from broker.web.access_audit import AccessAudit
from broker.web.auth import ReadAccess, TokenBook, read_tokens_file
from broker.web.dicomweb import routes as dicomweb
from broker.web.headers import SecurityHeaders
from broker.web.live import LiveFeed

DESCRIPTION = """The worklist broker's REST API and department status board.

Every data route needs an API token (setting `api_tokens`, `token:role`, or a SHA-256 hash of the token
in the file `api_tokens_file`; role `read`, `write` or `audit`), sent as `Authorization: Bearer <token>`;
changes need the write role, the audit trail the audit role. `/healthz` and `/readyz` need none.
"""


class BrokerApp(FastAPI):
    """FastAPI with :class:`~broker.web.headers.SecurityHeaders` outside everything else, so that even
    the 500 page of Starlette's error middleware carries the security headers."""

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack())



def create_app(settings: Settings, engine: Engine, *, intake: Intake | None = None,
               write_engine: Engine | None = None, live_interval: float = 0.5,
               audit: AuditWriter | None = None) -> FastAPI:
    """The application on ``engine`` (reads). Create / change / cancel and replay go through ``intake``,
    built on first use from ``write_engine`` (default ``engine``) and the mapping files when not given.
    ``audit``: where the Query and Security Alert records of requests go (None: none are recorded).

    Raises StartupError for a bad line in the tokens file (``api_tokens_file``)."""

    feed = LiveFeed(engine, live_interval)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await feed.close()

    # No /docs or /redoc: FastAPI's pages load Swagger UI / ReDoc from a CDN, and the hospital network
    # has no internet. /openapi.json is served; any OpenAPI viewer can read it.
    app = BrokerApp(title="Worklist broker", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                    docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.engine = engine
    app.state.tokens = TokenBook(settings.api_token_roles,
                                 read_tokens_file(settings.api_tokens_file) if settings.api_tokens_file else ())
    app.state.audit = audit
    app.state.feed = feed
    app.state.intake = _intake_factory(settings, write_engine or engine, intake)
    for module in (health, procedures, steps, messages, events, board, audit_trail, dicomweb):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=board.STATIC), name="static")
    app.add_middleware(RefuseControlCharacters)
    app.state.broker_participant = _broker_participant(settings)
    app.add_middleware(AccessAudit, submit=audit.submit if audit is not None else None,
                       broker=app.state.broker_participant)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (text exposition format)",
             responses={200: {"content": {"text/plain": {}}}})
    def metrics(request: Request, _: ReadAccess) -> Response:
        body, content_type = exposition(request.app.state.engine)
        return Response(body, media_type=content_type)

    return app


class RefuseControlCharacters:
    """Answer 422 to a request whose path or query parameters hold a control character (NUL, ...).

    No value the broker stores or filters on holds one, and PostgreSQL refuses NUL in a text
    parameter outright (the query would fail with 500). One check before any route, for every path
    and query parameter, instead of one per parameter. Pure ASGI, so the live stream is not buffered.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            where = _control_character_in(scope)
            if where is not None:
                detail = [{"type": "control_character", "loc": list(where),
                           "msg": "control characters (U+0000-U+001F, U+007F-U+009F) are not allowed"}]
                await JSONResponse({"detail": detail}, status_code=422)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _control_character_in(scope: Scope) -> tuple[str, ...] | None:
    """Where the first control character is: ("path",) or ("query", name); None when there is none."""
    if _has_control(scope.get("path", "")):  # already percent-decoded by the server
        return ("path",)
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True, encoding="utf-8", errors="replace"):
        if _has_control(name) or _has_control(value):
            return ("query", name)
    return None


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def _broker_participant(settings: Settings) -> Callable[[], Participant]:
    """The broker as the audit records' participant, made on first use (only when something is recorded)."""
    return functools.cache(lambda: broker_participant(settings.ae_title))


def _intake_factory(settings: Settings, engine: Engine, given: Intake | None) -> Callable[[], Intake]:
    lock = threading.Lock()
    made: list[Intake] = [given] if given is not None else []

    def intake() -> Intake:
        with lock:
            if not made:
                from broker.mapping.rules import load_mappings

                made.append(Intake(engine, load_mappings(settings.mappings_dir), settings.uid_root,
                                   audit=settings.audit_enabled, ae_title=settings.ae_title))
            return made[0]

    return intake
