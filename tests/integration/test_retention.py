"""Retention on both databases: each category leaves after its time and not before, what still needs a
row keeps it, stale steps are discontinued as an HL7 DC would do it, the export holds the timeline, and
``broker db purge`` through the real command line."""

from __future__ import annotations

import json
import stat
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, update

from broker.config import Settings, load_settings
from broker.dicom_json import value
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.outbox import outbox
from broker.outbox.outbox import OUTBOX
from broker.retention import apply_retention
from broker.store.tables import (
    MPPS,
    ORDERS,
    PATIENTS,
    PROCEDURE_TRANSITIONS,
    PROCEDURES,
    STEP_TRANSITIONS,
    STEPS,
    UPS_SUBSCRIPTIONS,
    AuditRecord,
    InboundMessage,
    table_of,
)
from tests.integration.test_cli import env_for, run_cli
from tests.mwl_support import Order as HL7Order
from tests.mwl_support import place

pytestmark = pytest.mark.integration

MESSAGES = table_of(InboundMessage)
AUDIT = table_of(AuditRecord)
FUTURE = "20991231090000"


def settings_for(database_url: str, tmp_path: Path, **extra: Any) -> Settings:
    return load_settings(database_url=database_url, retention_export_dir=str(tmp_path / "export"), **extra)


def ago(**delta: float) -> str:
    return (datetime.now() - timedelta(**delta)).strftime("%Y%m%d%H%M%S")


def count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as db:
        return int(db.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def every_table(engine: Engine) -> dict[str, int]:
    return {t.name: count(engine, t) for t in (STEPS, PROCEDURES, ORDERS, PATIENTS, MESSAGES, OUTBOX,
                                               PROCEDURE_TRANSITIONS, STEP_TRANSITIONS, AUDIT)}


def step_of(engine: Engine, sps: str) -> Any:
    with engine.connect() as db:
        return db.execute(select(STEPS).where(STEPS.c.sps_id == sps)).first()


def later(days: float) -> datetime:
    return datetime.now() + timedelta(days=days)


def add_event(engine: Engine, kind: str, payload: dict[str, Any], status: str, done_at: datetime | None) -> int:
    with engine.begin() as db:
        outbox.add_event(db, kind, payload, "", datetime.now())
        pk = db.execute(select(func.max(OUTBOX.c.id))).scalar_one()
        db.execute(update(OUTBOX).where(OUTBOX.c.id == pk).values(status=status, done_at=done_at))
    return int(pk)


def test_each_category_leaves_after_its_time_and_not_before(engine: Engine, database_url: str,
                                                            mappings: MappingSet, tmp_path: Path) -> None:
    place(Intake(engine, mappings),
          HL7Order("DONE1", "CT01", start=FUTURE, then=("SC^CM",)),
          HL7Order("GONE1", "CT01", start=FUTURE, then=("CA^CA",)),
          HL7Order("OPEN1", "CT01", start=FUTURE))
    done = add_event(engine, "ris.status", {}, "done", datetime.now())
    failed = add_event(engine, "ris.status", {}, "failed", None)
    settings = settings_for(database_url, tmp_path)
    messages = count(engine, MESSAGES)

    early = apply_retention(settings, engine, later(6))
    assert early.counts() == dict.fromkeys(early.counts(), 0)

    week = apply_retention(settings, engine, later(8))
    assert week.outbox_events_purged == 1 and week.procedures_purged == 0
    assert count(engine, OUTBOX, OUTBOX.c.id == done) == 0
    assert count(engine, OUTBOX, OUTBOX.c.id == failed) == 1, "a failed event waits for a person"

    assert apply_retention(settings, engine, later(29)).procedures_purged == 0

    month = apply_retention(settings, engine, later(31))
    assert (month.procedures_purged, month.steps_purged, month.orders_purged, month.patients_purged) == (2, 2, 2, 2)
    assert month.timelines_exported == 2
    assert {s.sps_id for s in _all(engine, STEPS)} == {"OPEN1"}
    assert count(engine, PROCEDURES) == count(engine, ORDERS) == count(engine, PATIENTS) == 1
    # the messages of the purged procedures went with them; the open order's NW stays (its timeline links it)
    assert month.hl7_messages_purged == messages - 1
    assert count(engine, MESSAGES) == 1
    assert count(engine, OUTBOX, OUTBOX.c.id == failed) == 1
    # the purge of patient data is audited: one Procedure Record (D) per procedure
    assert count(engine, AUDIT, AUDIT.c.event_id == "110111", AUDIT.c.action == "D") == 2
    assert apply_retention(settings, engine, later(31)).counts() == dict.fromkeys(month.counts(), 0)


def _all(engine: Engine, table: Any) -> list[Any]:
    with engine.connect() as db:
        return list(db.execute(select(table).order_by(table.c.id)))


def test_export_holds_summary_and_timeline(engine: Engine, database_url: str, mappings: MappingSet,
                                           tmp_path: Path) -> None:
    place(Intake(engine, mappings), HL7Order("EXP1", "CT01", start=FUTURE, name="SECRET^NAME", then=("SC^IP", "SC^CM")))
    report = apply_retention(settings_for(database_url, tmp_path), engine, later(31))
    assert report.timelines_exported == 1
    [path] = (tmp_path / "export").iterdir()
    assert path.name == f"retention-{later(31):%Y%m%d}.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"SECRET" not in path.read_bytes(), "the export names patients by ID, never by name"
    [line] = path.read_text().splitlines()
    document = json.loads(line)
    assert document["patient"] == {"patient_id": "PEXP1", "issuer": "CITYMED"}
    assert document["procedure"]["accession_number"] == "AEXP1"
    assert document["procedure"]["state"] == "COMPLETED"
    assert [(t["from"], t["to"]) for t in document["timeline"]] == [("SCHEDULED", "STARTED"),
                                                                    ("STARTED", "COMPLETED")]
    assert all(t["cause"].startswith("HL7 OMI^O23") for t in document["timeline"])
    [step] = document["steps"]
    assert step["sps_id"] == "EXP1"
    assert [t["to"] for t in step["transitions"]] == ["SCHEDULED", "STARTED", "COMPLETED"]
    assert document["order"]["placer_order_number"] == "PLEXP1"


def test_timeline_keep_and_delete(engine: Engine, database_url: str, mappings: MappingSet, tmp_path: Path) -> None:
    place(Intake(engine, mappings), HL7Order("KEEP1", "CT01", start=FUTURE, then=("SC^CM",)))
    kept = apply_retention(settings_for(database_url, tmp_path, retention_timeline="keep"), engine, later(31))
    assert (kept.procedures_purged, kept.steps_purged, kept.timelines_exported) == (1, 1, 0)
    assert count(engine, STEPS) == 0
    assert count(engine, PROCEDURES) == count(engine, ORDERS) == count(engine, PATIENTS) == 1
    assert [t.to_state for t in _all(engine, PROCEDURE_TRANSITIONS)] == ["COMPLETED"]
    again = apply_retention(settings_for(database_url, tmp_path, retention_timeline="keep"), engine, later(32))
    assert again.procedures_purged == 0, "a kept procedure is purged once"

    # switched to delete, the kept summaries go too, with the procedures finished since
    place(Intake(engine, mappings), HL7Order("DEL1", "CT01", start=FUTURE, then=("SC^CM",)))
    deleted = apply_retention(settings_for(database_url, tmp_path, retention_timeline="delete"), engine, later(31))
    assert (deleted.procedures_purged, deleted.steps_purged, deleted.timelines_exported) == (2, 1, 0)
    assert not (tmp_path / "export").exists()
    assert count(engine, PROCEDURES) == count(engine, PROCEDURE_TRANSITIONS) == count(engine, ORDERS) \
        == count(engine, PATIENTS) == 0


def test_dry_run_changes_nothing(engine: Engine, database_url: str, mappings: MappingSet, tmp_path: Path) -> None:
    place(Intake(engine, mappings),
          HL7Order("DRY1", "CT01", start=FUTURE, then=("SC^CM",)),
          HL7Order("DRY2", "CT01", start=ago(days=3)))
    add_event(engine, "ris.status", {}, "done", datetime.now())
    before = every_table(engine)
    report = apply_retention(settings_for(database_url, tmp_path), engine, later(31), dry_run=True)
    assert report.dry_run
    assert (report.procedures_purged, report.stale_steps_discontinued, report.outbox_events_purged,
            report.timelines_exported) == (1, 1, 1, 1)
    assert every_table(engine) == before
    assert step_of(engine, "DRY2").sps_status == "SCHEDULED"
    assert not (tmp_path / "export").exists()


def test_stale_step_is_discontinued_with_its_ups_and_ris_events(engine: Engine, database_url: str,
                                                                mappings: MappingSet, tmp_path: Path) -> None:
    place(Intake(engine, mappings),
          HL7Order("STALE1", "CT01", start=ago(days=2)),
          HL7Order("TODAY1", "CT01", start=ago(hours=1)),
          HL7Order("BEGUN1", "CT01", start=ago(days=2), then=("SC^IP",)))
    stale = step_of(engine, "STALE1")
    with engine.begin() as db:
        db.execute(insert(UPS_SUBSCRIPTIONS).values(
            subscriber_ae="WATCHER", workitem_uid=stale.ups_instance_uid, is_global=False, matching_keys=None,
            deletion_lock=False, suspended_at=None, created_at=datetime.now()))
    settings = settings_for(database_url, tmp_path, ris_hl7_address="127.0.0.1:2576")
    report = apply_retention(settings, engine, datetime.now())
    assert report.stale_steps_discontinued == 1
    assert step_of(engine, "STALE1").sps_status == "DISCONTINUED"
    assert step_of(engine, "TODAY1").sps_status == "SCHEDULED", "within its grace"
    assert step_of(engine, "BEGUN1").sps_status == "STARTED", "a started step is left to MPPS"
    cause = f"retention: not started by {stale.scheduled_start:%Y-%m-%d %H:%M} + 24 h"
    with engine.connect() as db:
        [step_line] = db.execute(select(STEP_TRANSITIONS).where(STEP_TRANSITIONS.c.step_fk == stale.id,
                                                                STEP_TRANSITIONS.c.to_status == "DISCONTINUED")).all()
        [line] = db.execute(select(PROCEDURE_TRANSITIONS)
                            .where(PROCEDURE_TRANSITIONS.c.procedure_fk == stale.procedure_fk)).all()
        events = db.execute(select(OUTBOX).order_by(OUTBOX.c.id)).all()
        procedure = db.execute(select(PROCEDURES).where(PROCEDURES.c.id == stale.procedure_fk)).one()
    assert step_line.cause == cause
    assert (line.from_state, line.to_state, line.cause, line.event_kind) == ("SCHEDULED", "DISCONTINUED", cause,
                                                                             "retention")
    assert procedure.state == "DISCONTINUED"
    [ris] = [e for e in events if e.kind == "ris.status"]
    assert (ris.payload["order_status"], ris.payload["accession_number"], ris.status) == ("DC", "ASTALE1", "pending")
    [ups] = [e for e in events if e.kind == "ups.event"]
    assert (ups.payload["subscriber"], ups.payload["uid"], ups.payload["event_type"]) == (
        "WATCHER", stale.ups_instance_uid, 1)
    assert value(ups.payload["info"], "ProcedureStepState") == "CANCELED", "a UPS has no DISCONTINUED"
    assert count(engine, AUDIT, AUDIT.c.event_id == "110111", AUDIT.c.action == "U") == 1

    # its events not done yet, the procedure stays past its retention; once they are, it goes
    held = apply_retention(settings, engine, later(31))
    assert (held.procedures_held, held.procedures_purged) == (1, 0)
    assert count(engine, PROCEDURES, PROCEDURES.c.id == stale.procedure_fk) == 1
    with engine.begin() as db:
        db.execute(update(OUTBOX).values(status="done", done_at=datetime.now()))
    gone = apply_retention(settings, engine, later(31))
    assert gone.procedures_purged == 1
    assert count(engine, PROCEDURES, PROCEDURES.c.id == stale.procedure_fk) == 0
    assert count(engine, UPS_SUBSCRIPTIONS) == 0, "its workitem's subscriptions went with it"


def test_a_pending_event_holds_its_procedure(engine: Engine, database_url: str, mappings: MappingSet,
                                             tmp_path: Path) -> None:
    place(Intake(engine, mappings), HL7Order("HOLD1", "CT01", start=FUTURE, then=("SC^CM",)))
    procedure_pk = step_of(engine, "HOLD1").procedure_fk
    event = add_event(engine, "ris.status", {"procedure_pk": procedure_pk}, "failed", None)
    settings = settings_for(database_url, tmp_path)
    report = apply_retention(settings, engine, later(40))
    assert (report.procedures_held, report.procedures_purged) == (1, 0)
    assert step_of(engine, "HOLD1") is not None
    with engine.begin() as db:
        db.execute(update(OUTBOX).where(OUTBOX.c.id == event).values(status="done", done_at=datetime.now()))
    assert apply_retention(settings, engine, later(40)).procedures_purged == 1


def test_more_rows_than_one_batch(engine: Engine, database_url: str, mappings: MappingSet, tmp_path: Path) -> None:
    orders = [HL7Order(f"BAT{n}", "CT01", start=FUTURE, then=("SC^CM",)) for n in range(5)]
    orders += [HL7Order(f"OLD{n}", "CT01", start=ago(days=3)) for n in range(3)]
    place(Intake(engine, mappings), *orders)
    for _ in range(5):
        add_event(engine, "ris.status", {}, "done", datetime.now())
    settings = settings_for(database_url, tmp_path, retention_batch_size=2)
    first = apply_retention(settings, engine, datetime.now())
    assert first.stale_steps_discontinued == 3
    report = apply_retention(settings, engine, later(31))
    assert (report.procedures_purged, report.steps_purged, report.outbox_events_purged) == (8, 8, 5)
    assert report.timelines_exported == 8
    assert len((tmp_path / "export" / f"retention-{later(31):%Y%m%d}.jsonl").read_text().splitlines()) == 8
    assert count(engine, STEPS) == count(engine, PROCEDURES) == count(engine, MESSAGES) == 0


def printed(stdout: str) -> dict[str, int]:
    """The counts ``broker db purge`` printed, by category."""
    return {name: int(number) for name, number in (line.rsplit(maxsplit=1) for line in stdout.splitlines()[1:])}


def test_broker_db_purge_on_the_command_line(tmp_path: Path, mappings: MappingSet) -> None:
    database_url = f"sqlite:///{tmp_path / 'broker.db'}"
    env = env_for(database_url, BROKER_RETENTION_EXPORT_DIR=str(tmp_path / "export"))
    assert run_cli("db", "upgrade", env=env).returncode == 0
    from broker.store.session import make_engine

    engine = make_engine(database_url)
    try:
        place(Intake(engine, mappings), HL7Order("CLI1", "CT01", start=ago(days=2)))
        dry = run_cli("db", "purge", "--dry-run", env=env)
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines()[0] == "dry run: nothing was changed; would remove:"
        assert printed(dry.stdout)["stale steps discontinued"] == 1
        assert step_of(engine, "CLI1").sps_status == "SCHEDULED"
        real = run_cli("db", "purge", env=env)
        assert real.returncode == 0, real.stderr
        assert real.stdout.splitlines()[0] == "removed:"
        assert printed(real.stdout)["stale steps discontinued"] == 1
        assert step_of(engine, "CLI1").sps_status == "DISCONTINUED"
        assert '"event": "retention.pass"' in real.stdout + real.stderr
    finally:
        engine.dispose()


def test_unscheduled_mpps_leaves_once_final_and_old(engine: Engine, database_url: str, tmp_path: Path) -> None:
    now = datetime.now()
    with engine.begin() as db:
        for uid, status in (("1.2.3.1", "COMPLETED"), ("1.2.3.2", "IN PROGRESS")):
            db.execute(insert(MPPS).values(sop_instance_uid=uid, status=status, step_fk=None, procedure_fk=None,
                                           study_instance_uid="1.2.3", calling_ae="CT01", dataset={},
                                           unscheduled=True, created_at=now, updated_at=now))
    settings = settings_for(database_url, tmp_path)
    assert apply_retention(settings, engine, later(29)).unlinked_records_purged == 0
    assert apply_retention(settings, engine, later(31)).unlinked_records_purged == 1
    assert [m.sop_instance_uid for m in _all(engine, MPPS)] == ["1.2.3.2"], "one still in progress stays"
