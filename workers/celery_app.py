"""The Celery application: Redis (``BROKER_REDIS_URL``) as message broker.

Delivery settings are chosen for "no event lost": tasks are acknowledged late (after they ran), a
task whose worker died is redelivered, and a worker takes one task at a time. The tasks,
``workers.tasks.run_events`` (what the relay publishes: a few event ids) and ``workers.tasks.run_event``
(one), are idempotent by event id (broker.outbox.runner), so a redelivery is harmless.
"""

from __future__ import annotations

from celery import Celery

from broker.config import Settings

RUN_EVENT = "workers.tasks.run_event"
RUN_EVENTS = "workers.tasks.run_events"


def make_celery_for(redis_url: str) -> Celery:
    """A Celery app on ``redis_url`` (``memory://`` when empty) with the broker's tasks registered."""
    app = Celery("broker", broker=redis_url or "memory://", include=["workers.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        # the relay publishes with retry=False and tries again at its next poll: fail fast when Redis is down
        broker_connection_timeout=2,
        broker_transport_options={"visibility_timeout": 3600},
        worker_hijack_root_logger=False,
    )
    from workers.tasks import register

    register(app)
    return app


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the configured Redis; ``memory://`` when the embedded queue is configured."""
    return make_celery_for(settings.redis_url)
