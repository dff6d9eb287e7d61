"""The retention settings as cut-off moments (0 = kept for ever), the timeline's cause, the CLI's report."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from broker.config import SettingsError, load_settings
from broker.retention.policy import RetentionPolicy, RetentionReport
from broker.retention.stale_steps import cause_of

NOW = datetime(2026, 12, 5, 3, 0, 0)


def test_defaults_a_department_expects() -> None:
    policy = RetentionPolicy.from_settings(load_settings(), NOW)
    assert policy.procedures_before == NOW - timedelta(days=30)
    assert policy.hl7_before == NOW - timedelta(days=30)
    assert policy.outbox_before == NOW - timedelta(days=7)
    assert policy.stale_steps_before == NOW - timedelta(hours=24)
    assert policy.channel_reports_before == NOW - timedelta(hours=72)
    assert (policy.timeline, policy.export_dir, policy.batch_size) == ("export", Path("var/retention"), 1000)


def test_zero_keeps_a_category_for_ever() -> None:
    policy = RetentionPolicy.from_settings(load_settings(
        retention_procedure_days=0, retention_hl7_days=0, retention_outbox_days=0,
        retention_stale_step_grace_hours=0, retention_channel_report_hours=0), NOW)
    assert (policy.procedures_before, policy.hl7_before, policy.outbox_before, policy.stale_steps_before,
            policy.channel_reports_before) == (None, None, None, None, None)


@pytest.mark.parametrize("setting", [{"retention_timeline": "archive"}, {"retention_hl7_days": -1},
                                     {"retention_batch_size": 0}])
def test_bad_values_stop_start_up(setting: dict[str, object]) -> None:
    with pytest.raises(SettingsError):
        load_settings(**setting)


def test_the_timeline_says_why_a_step_was_discontinued() -> None:
    step = SimpleNamespace(scheduled_start=datetime(2026, 11, 23, 9, 30), created_at=NOW, sps_id="SPS1")
    cause = cause_of(step, 24.0)
    assert (cause.text, cause.event_kind, cause.event_ref) == (
        "retention: not started by 2026-11-23 09:30 + 24 h", "retention", "SPS1")
    unscheduled = SimpleNamespace(scheduled_start=None, created_at=datetime(2026, 11, 1, 8, 0), sps_id="SPS2")
    assert cause_of(unscheduled, 1.5).text == "retention: not started by 2026-11-01 08:00 + 1.5 h"


def test_report_lines_name_every_category() -> None:
    report = RetentionReport(procedures_purged=3, hl7_messages_purged=12)
    lines = report.lines()
    assert len(lines) == len(report.counts())
    assert "dry_run" not in report.counts()
    assert dict(line.rsplit(maxsplit=1) for line in lines)["procedures purged"] == "3"
    assert dict(line.rsplit(maxsplit=1) for line in lines)["hl7 messages purged"] == "12"
