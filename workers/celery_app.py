"""The Celery application of the worker processes: Redis (``BROKER_REDIS_URL``) as message broker.

The app and its delivery settings are :func:`broker.events.queue.celery_for`'s (the relay publishes
with the same); here the tasks are registered. The tasks, ``workers.tasks.run_events`` (what the relay
publishes: a few event ids) and ``workers.tasks.run_event`` (one), are idempotent by event id
(broker.outbox.runner), so a redelivery is harmless.
"""

from __future__ import annotations

from celery import Celery

from broker.config import Settings
from broker.events.queue import celery_for
from workers.tasks import register


def make_celery_for(redis_url: str) -> Celery:
    """A Celery app on ``redis_url`` (``memory://`` when empty) with the broker's tasks registered."""
    app = celery_for(redis_url)
    register(app)
    return app


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the configured Redis; ``memory://`` when the embedded queue is configured."""
    return make_celery_for(settings.redis_url)
