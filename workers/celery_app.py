"""The Celery application: Redis (``BROKER_REDIS_URL``) as message broker.

Delivery settings are chosen for "no event lost": tasks are acknowledged late (after they ran), a
task whose worker died is redelivered, and a worker takes one task at a time. The tasks of the
procedure status pipeline are registered in ``workers.tasks`` as they are built.
"""

from __future__ import annotations

from celery import Celery

from broker.config import Settings


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the configured Redis; ``memory://`` when the embedded queue is configured."""
    app = Celery("broker", broker=settings.redis_url or "memory://", include=[])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600},
        worker_hijack_root_logger=False,
    )
    return app
