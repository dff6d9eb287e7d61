"""``/healthz`` (the process answers) and ``/readyz`` (it can do its work: database reachable and at the
newest schema, Redis answering PING when a Redis queue is configured). Neither needs a token: they
carry no data and load balancers call them."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import text

from broker.store import migrate

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = Field(description="ok")


class Readiness(BaseModel):
    status: str = Field(description="ready or unavailable")
    checks: dict[str, str] = Field(description="each dependency: ok, or what is wrong")


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, summary="Readiness: database (and Redis) usable",
            responses={503: {"model": Readiness, "description": "a dependency is not usable"}})
async def readyz(request: Request) -> Any:
    checks = {"database": await asyncio.to_thread(_database, request)}
    redis_url: str = request.app.state.settings.redis_url
    if redis_url:
        checks["redis"] = await asyncio.to_thread(_redis, redis_url)
    ready = all(v == "ok" for v in checks.values())
    body = Readiness(status="ready" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def _database(request: Request) -> str:
    try:
        with request.app.state.engine.connect() as db:
            db.execute(text("SELECT 1"))
        if not migrate.is_current(request.app.state.engine):
            return "schema not current: run 'broker db upgrade'"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok"


def _redis(url: str) -> str:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok"
