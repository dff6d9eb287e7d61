"""UPS event reports for a WebSocket subscriber whose channel never opens: the retention pass marks them
failed after ``retention_channel_report_hours`` (so the outbox does not grow for ever), the failed list
shows them, and a retry puts them back where the subscriber's channel takes them, in order."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from broker.config import load_settings
from broker.outbox import consumer, outbox
from broker.outbox.runner import retry_failed
from broker.reports import failed_event_rows
from broker.retention import apply_retention
from broker.store.tables import OutboxEvent, table_of

pytestmark = pytest.mark.integration

OUTBOX = table_of(OutboxEvent)
NOW = datetime(2026, 12, 5, 12, 0, 0)
KEY = "ups-subscriber:AI_ORCH"


def _report(engine: Engine, kind: str, hours_ago: float, key: str = KEY, seq: int = 0) -> int:
    with engine.begin() as db:
        event_id = outbox.add_event(db, kind, {"uid": "1.2.3", "event_type": 1, "seq": seq}, key,
                                    NOW - timedelta(hours=hours_ago))
        return int(db.execute(select(OUTBOX.c.id).where(OUTBOX.c.event_id == event_id)).scalar_one())


def _status(engine: Engine, pk: int) -> tuple[str, str]:
    with engine.connect() as db:
        row = db.execute(select(OUTBOX.c.status, OUTBOX.c.last_error).where(OUTBOX.c.id == pk)).one()
    return row.status, row.last_error


def test_reports_no_channel_took_are_failed_after_the_hold_then_retried_in_order(
        engine: Engine, database_url: str, tmp_path: Path) -> None:
    old_first = _report(engine, outbox.UPS_WS_EVENT, 100, seq=1)
    old_second = _report(engine, outbox.UPS_WS_EVENT, 73, seq=2)
    recent = _report(engine, outbox.UPS_WS_EVENT, 71, seq=3)
    dimse = _report(engine, outbox.UPS_EVENT, 100, key="ups-subscriber:CT01")  # retried by the workers, not here
    settings = load_settings(database_url=database_url, retention_export_dir=str(tmp_path / "export"))
    assert settings.retention_channel_report_hours == 72

    counted = apply_retention(settings, engine, NOW, dry_run=True)
    assert counted.channel_reports_failed == 2
    assert _status(engine, old_first)[0] == "pending"  # a dry run changes nothing

    assert apply_retention(settings, engine, NOW).channel_reports_failed == 2
    status, error = _status(engine, old_first)
    assert status == "failed" and "no WebSocket channel took this report before 2026-12-02 12:00" in error
    assert _status(engine, old_second)[0] == "failed"
    assert _status(engine, recent) == ("pending", "")
    assert _status(engine, dimse)[0] == "pending"
    assert [(row.id, row.kind) for row in failed_event_rows(engine)] == [
        (old_first, outbox.UPS_WS_EVENT), (old_second, outbox.UPS_WS_EVENT)]
    # what the channel would send now: only the report within the hold
    assert [event.id for event in consumer.pending(engine, [KEY], outbox.UPS_WS_EVENT)] == [recent]

    assert apply_retention(settings, engine, NOW).channel_reports_failed == 0  # nothing left to fail

    # a person retries them: the channel takes all three again, in the order of the changes
    assert retry_failed(engine, str(old_first)) and retry_failed(engine, str(old_second))
    assert [event.payload["seq"] for event in consumer.pending(engine, [KEY], outbox.UPS_WS_EVENT)] == [1, 2, 3]


def test_zero_hours_waits_for_ever(engine: Engine, database_url: str, tmp_path: Path) -> None:
    pk = _report(engine, outbox.UPS_WS_EVENT, 24 * 365)
    settings = load_settings(database_url=database_url, retention_export_dir=str(tmp_path / "export"),
                             retention_channel_report_hours=0)
    assert apply_retention(settings, engine, NOW).channel_reports_failed == 0
    assert _status(engine, pk)[0] == "pending"


def test_a_delivered_report_is_not_touched(engine: Engine, database_url: str, tmp_path: Path) -> None:
    pk = _report(engine, outbox.UPS_WS_EVENT, 100)
    assert consumer.mark_done(engine, [pk], NOW - timedelta(hours=99)) == 1
    settings = load_settings(database_url=database_url, retention_export_dir=str(tmp_path / "export"),
                             retention_outbox_days=0)
    assert apply_retention(settings, engine, NOW).channel_reports_failed == 0
    assert _status(engine, pk)[0] == "done"
