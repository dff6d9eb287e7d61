"""Celery application and tasks of the event pipeline."""
