"""The retention settings as cut-off moments, and the report of one pass.

Every category has its own age; 0 days (0 hours for stale steps) switches it off. The cut-offs are
computed once per pass from the pass's ``now``, so one pass applies one set of moments however long it
runs, and a test or the benchmark can move the clock.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from broker.config import Settings

Timeline = Literal["keep", "export", "delete"]


@dataclass(frozen=True)
class RetentionPolicy:
    """What one pass removes: each ``*_before`` is None when that category is kept for ever."""

    procedures_before: datetime | None
    stale_steps_before: datetime | None
    hl7_before: datetime | None
    outbox_before: datetime | None
    channel_reports_before: datetime | None
    grace_hours: float
    timeline: Timeline
    export_dir: Path
    batch_size: int

    @classmethod
    def from_settings(cls, settings: Settings, now: datetime) -> RetentionPolicy:
        def days_ago(days: int) -> datetime | None:
            return now - timedelta(days=days) if days > 0 else None

        grace = settings.retention_stale_step_grace_hours
        return cls(
            procedures_before=days_ago(settings.retention_procedure_days),
            stale_steps_before=now - timedelta(hours=grace) if grace > 0 else None,
            hl7_before=days_ago(settings.retention_hl7_days),
            outbox_before=days_ago(settings.retention_outbox_days),
            channel_reports_before=(now - timedelta(hours=settings.retention_channel_report_hours)
                                    if settings.retention_channel_report_hours > 0 else None),
            grace_hours=grace,
            timeline=settings.retention_timeline,
            export_dir=Path(settings.retention_export_dir),
            batch_size=settings.retention_batch_size,
        )


@dataclass
class RetentionReport:
    """What one pass did (or, in a dry run, would do), per category.

    ``procedures_held``: procedures old enough that were kept because something still needs them (an
    outbox event not done, a UPS deletion lock, a commitment request still waiting).
    """

    stale_steps_discontinued: int = 0
    procedures_purged: int = 0
    procedures_held: int = 0
    steps_purged: int = 0
    timelines_exported: int = 0
    orders_purged: int = 0
    patients_purged: int = 0
    unlinked_records_purged: int = 0
    hl7_messages_purged: int = 0
    outbox_events_purged: int = 0
    channel_reports_failed: int = 0
    dry_run: bool = False

    def counts(self) -> dict[str, int]:
        """The counts by name, in the order of the fields (what the log line and the CLI show)."""
        return {name: value for name, value in asdict(self).items() if name != "dry_run"}

    def lines(self) -> list[str]:
        """One ``name: count`` line per category, for ``broker db purge``."""
        width = max(len(f.name) for f in fields(self))
        return [f"{name.replace('_', ' '):<{width}}  {value}" for name, value in self.counts().items()]
