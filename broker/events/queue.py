"""The task queue's side the broker publishes to: Celery on Redis, with the task names and the delivery settings.

Delivery settings are chosen for "no event lost": tasks are acknowledged late (after they ran), a task
whose worker died is redelivered, and a worker takes one task at a time. The relay publishes by task
name, so its app needs no tasks registered; the worker process (``workers.celery_app``) builds on the
same app and registers them.
"""

from __future__ import annotations

from celery import Celery

RUN_EVENT = "workers.tasks.run_event"
RUN_EVENTS = "workers.tasks.run_events"


def celery_for(redis_url: str) -> Celery:
    """A Celery app on ``redis_url`` (``memory://`` when empty) with the broker's delivery settings."""
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
    return app
