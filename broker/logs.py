"""Structured logging with structlog: JSON lines in production, readable lines on a console.

Patient data stays out of logs by default (``log_patient_data`` turns it on, for a debugging session on a
test system). Log calls name the field and the problem; the values a message carried reach a log only
inside free text, so :func:`withhold_message_values` works on every event rather than on chosen call
sites: keys that would carry patient data are redacted, quoted values (problem texts and validation
errors quote the offending value, ``'1971XXXX'``) and exception messages (``ValueError: ...``, and the
last line of every traceback, which may quote a name or a SQL parameter) are withheld. What a sender gets
back (HL7 ERR, DICOM Error Comment) still names the value: only logs are concerned.

Python warnings (pydicom's "Expected implicit VR, but found explicit VR", ...) become structured
events too, carrying the context bound where they arose (a DICOM association binds its calling AE
title and peer address), instead of a raw ``UserWarning`` line on stderr.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
import warnings
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

PATIENT_DATA_KEYS = frozenset({"patient_name", "birth_date", "patient_birth_date", "address"})
WITHHELD = "[withheld]"
# a value quoted as repr() writes it: '...' or "..." (with backslash escapes)
_QUOTED = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""")
# an exception rendered as "SomeError: message": the message, up to the next "; " of a list of problems
_EXCEPTION_TEXT = re.compile(r"\b([A-Z][A-Za-z0-9_]*(?:Error|Exception|Warning|Failure))(: )(?:(?!; ).)+")
_STRUCTURAL_KEYS = frozenset({"event", "level", "timestamp", "logger"})


def redact_patient_data(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Remove values that identify a patient by name or birth date."""
    for key in PATIENT_DATA_KEYS & event.keys():
        event[key] = "[redacted]"
    return event


def withhold_text(text: str) -> str:
    """``text`` with quoted values and exception messages replaced by :data:`WITHHELD`."""
    return _EXCEPTION_TEXT.sub(rf"\1\2{WITHHELD}", _QUOTED.sub(WITHHELD, text))


def _withheld(value: Any) -> Any:
    if isinstance(value, str):
        return withhold_text(value)
    if isinstance(value, list | tuple):
        return type(value)(_withheld(v) for v in value)
    if isinstance(value, dict):
        return {k: _withheld(v) for k, v in value.items()}
    return value


def withhold_message_values(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Patient data off: redact patient keys, withhold quoted values and exception messages in every
    field, and render an exception's traceback without its message (type, frames and code lines stay)."""
    redact_patient_data(_logger, _method, event)
    exc_info = event.pop("exc_info", None)
    for key in event.keys() - _STRUCTURAL_KEYS:
        event[key] = _withheld(event[key])
    if exc_info:
        event["exception"] = _traceback_without_messages(exc_info)
    return event


def _traceback_without_messages(exc_info: Any) -> str:
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or exc_info[1] is None:
        return ""
    rendered = traceback.TracebackException(*exc_info)
    seen: set[int] = set()
    pending = [rendered]
    while pending:  # the exception, its causes and contexts (and the members of a group)
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        current._str = WITHHELD  # type: ignore[attr-defined]  # printed after "Type: " (CPython 3.11+)
        current.__notes__ = None
        for attr in ("filename", "text"):  # SyntaxError's own line shows the offending source
            if hasattr(current, attr):
                setattr(current, attr, None)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        pending.extend(getattr(current, "exceptions", None) or [])
    return "".join(rendered.format()).rstrip("\n")


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    """``warnings.showwarning``: a warning is a structured event with the context bound where it arose."""
    structlog.get_logger("py.warnings").warning("python.warning", category=category.__name__, warning=str(message),
                                                origin=f"{filename.rsplit('/', 1)[-1]}:{lineno}")


class _ToStructlog(logging.Handler):
    """Records of a library logger that also warns (pydicom logs each warning it raises) as structured
    events, so that they carry the context and the redaction too."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger(record.name).log(record.levelno, "library.message", library=record.name,
                                              text=record.getMessage())


def configure(log_format: str = "json", level: str = "INFO", patient_data: bool = False) -> None:
    """Configure structlog and the standard library's logging (for pynetdicom, SQLAlchemy, Celery)."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if patient_data:
        processors.append(structlog.processors.format_exc_info)
    else:
        processors.append(withhold_message_values)
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
    pydicom_log = logging.getLogger("pydicom")
    pydicom_log.handlers[:] = [_ToStructlog()]
    pydicom_log.setLevel(max(numeric, logging.WARNING))
    pydicom_log.propagate = False
    # pydicom says each warning twice (logger and warnings.warn): the logger's copy is the one kept
    warnings.filterwarnings("ignore", module="pydicom")
    warnings.showwarning = _log_warning
