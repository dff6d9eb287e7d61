"""Structured logging with structlog: JSON lines in production, readable lines on a console.

Patient data stays out of logs by default: the :func:`redact_patient_data` processor drops keys that
would carry it unless ``log_patient_data`` is set (for a debugging session on a test system).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

PATIENT_DATA_KEYS = frozenset({"patient_name", "birth_date", "patient_birth_date", "address"})


def redact_patient_data(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Remove values that identify a patient by name or birth date."""
    for key in PATIENT_DATA_KEYS & event.keys():
        event[key] = "[redacted]"
    return event


def configure(log_format: str = "json", level: str = "INFO", patient_data: bool = False) -> None:
    """Configure structlog and the standard library's logging (for pynetdicom, SQLAlchemy, Celery)."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not patient_data:
        processors.append(redact_patient_data)
    processors.append(structlog.processors.format_exc_info)
    renderer: Any = (structlog.processors.JSONRenderer() if log_format == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
