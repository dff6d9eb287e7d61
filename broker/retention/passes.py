"""One retention pass over every category: what the periodic job and ``broker db purge`` run.

The order matters: stale steps are discontinued first (their procedures then wait out their own
retention, counted from that change, so the RIS and UPS subscribers hear of it long before anything is
deleted); finished procedures next, which frees the HL7 messages their timelines linked to; then the
HL7 archive, the done outbox events and the unlinked records. Every category works in batches of
``retention_batch_size`` rows, one short transaction each, so a large first purge holds no lock for
long and keeps one batch in memory.

A dry run counts what each category holds now and changes nothing (no export file, no audit record);
a real pass may purge a few more HL7 messages than it counted, those freed by the procedures it purges.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import structlog
from sqlalchemy import Engine

from broker.config import Settings
from broker.retention import archives, procedures, stale_steps
from broker.retention.policy import RetentionPolicy, RetentionReport
from broker.workflow.context import WorkflowConfig

log = structlog.get_logger(__name__)


def apply_retention(settings: Settings, engine: Engine, now: datetime, dry_run: bool = False, *,
                    wake: Callable[[], None] | None = None) -> RetentionReport:
    """Apply (or with ``dry_run`` count) the retention settings as of ``now`` (naive local time, as stored).

    ``wake``: called when discontinued steps queued outbox events (the relay's wake-up), so the RIS and
    UPS subscribers hear of them without waiting for a poll. Logs one ``retention.pass`` line with the
    counts.
    """
    policy = RetentionPolicy.from_settings(settings, now)
    report = RetentionReport(dry_run=dry_run)
    workflow = WorkflowConfig.from_settings(settings)
    if dry_run:
        report.stale_steps_discontinued = stale_steps.count_stale(engine, policy)
    else:
        report.stale_steps_discontinued = stale_steps.discontinue_stale(
            engine, policy, now, ris_transitions=workflow.ris_transitions, ae_title=settings.ae_title,
            audit=settings.audit_enabled)
        if report.stale_steps_discontinued and wake is not None:
            wake()
    purged = procedures.purge_procedures(engine, policy, now, dry_run=dry_run, ae_title=settings.ae_title,
                                         audit=settings.audit_enabled)
    report.procedures_purged = purged.purged
    report.procedures_held = purged.held
    report.steps_purged = purged.steps
    report.timelines_exported = purged.exported
    report.orders_purged = purged.orders
    report.patients_purged = purged.patients
    report.unlinked_records_purged = archives.purge_unlinked(engine, policy.procedures_before, policy.batch_size,
                                                             dry_run)
    report.hl7_messages_purged = archives.purge_messages(engine, policy.hl7_before, policy.batch_size, dry_run)
    report.outbox_events_purged = archives.purge_outbox(engine, policy.outbox_before, policy.batch_size, dry_run)
    report.channel_reports_failed = archives.fail_channel_reports(engine, policy.channel_reports_before,
                                                                  policy.batch_size, dry_run)
    log.info("retention.pass", dry_run=dry_run, timeline=policy.timeline, **report.counts())
    return report
