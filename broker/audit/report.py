"""``broker audit``: the search's answer as a table, JSON lines or the audit messages themselves."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Literal

from sqlalchemy import Engine

from broker.audit.search import AuditFilter, search
from broker.audit.shipper import source_id
from broker.config import Settings

COLUMNS = ("id", "recorded_at", "event", "action", "outcome", "user_id", "host", "patient_ids", "delivered_at")


def audit_report(engine: Engine, settings: Settings, *, since: datetime | None = None, until: datetime | None = None,
                 patient: str = "", user: str = "", event: str = "", limit: int = 100,
                 output: Literal["table", "json", "xml"] = "table") -> str:
    """The records matching the filters, newest first, in ``output`` form."""
    found = search(engine, AuditFilter(since, until, patient, user, event, limit), source_id=source_id(settings),
                   site_id=settings.audit_enterprise_site_id)
    if output == "xml":
        return "\n".join(entry["xml"] for entry in found)
    if output == "json":
        return "\n".join(json.dumps(entry, ensure_ascii=False) for entry in found)
    if not found:
        return "no audit records match"
    rows = [[_cell(entry[column]) for column in COLUMNS] for entry in found]
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(COLUMNS)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(COLUMNS, widths, strict=True))]
    lines.extend("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                 for row in rows)
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)
