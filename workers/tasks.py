"""Celery tasks: thin, they load the event and call the runner (broker.outbox.runner).

Each worker process builds its runner on first use (after the prefork fork), with its own engine and
its own persistent MLLP connection to the RIS.
"""

from __future__ import annotations

import threading

from celery import Celery

from broker.config import load_settings
from broker.events.queue import RUN_EVENT, RUN_EVENTS
from broker.events.wiring import build_runner
from broker.outbox.runner import EventRunner
from broker.store.session import make_engine

_lock = threading.Lock()
_runner: EventRunner | None = None


def runner() -> EventRunner:
    """This process's runner, configured from the settings (BROKER_* and the YAML file)."""
    global _runner
    with _lock:
        if _runner is None:
            settings = load_settings()
            _runner = build_runner(settings, make_engine(settings.database_url, pool_size=2))
        return _runner


def run_event(event_id: str) -> str:
    """Perform the outbox event ``event_id`` (idempotent: a done event is not run again)."""
    return runner().run(event_id)


def run_events(event_ids: list[str]) -> list[str]:
    """Perform the outbox events ``event_ids`` (what the relay publishes) as one batch: one claim and one
    done transaction for all of them, the handlers one after the other."""
    return runner().run_many(event_ids)


def register(app: Celery) -> None:
    """Register the tasks on ``app`` under their fixed names."""
    app.task(name=RUN_EVENT, ignore_result=True)(run_event)
    app.task(name=RUN_EVENTS, ignore_result=True)(run_events)
