"""Building the HL7 intake of a process from the settings: the listener process of ``broker run`` and
each intake process build it the same way."""

from __future__ import annotations

from broker.config import Settings, StartupError
from broker.intake.service import Intake
from broker.mapping.rules import load_mappings
from broker.store import migrate
from broker.store.session import make_engine


def build_intake(settings: Settings, pool_size: int | None = None) -> Intake:
    """The HL7 intake wired to the configured database and mappings."""
    engine = make_engine(settings.database_url, pool_size=pool_size or settings.hl7_workers,
                         plan_each_execution=True)
    if not migrate.is_current(engine):
        raise StartupError("the database schema is not current: run 'broker db upgrade' first")
    mappings = load_mappings(settings.mappings_dir)
    archive = make_engine(settings.database_url, pool_size=pool_size or settings.hl7_workers,
                          flush_with_next_commit=True)
    group_commit = {"on": True, "off": False}.get(settings.hl7_group_commit)  # auto: None, per database
    return Intake(engine, mappings, settings.uid_root, archive_engine=archive, group_commit=group_commit,
                  audit=settings.audit_enabled, ae_title=settings.ae_title)
