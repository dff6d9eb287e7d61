"""Recording audit events on both databases: in the caller's transaction, and batched by the writer."""

from __future__ import annotations

import threading
import time
from datetime import datetime

from sqlalchemy import Engine, func, select

from broker.audit import events
from broker.audit.events import Source
from broker.audit.stored import from_json
from broker.audit.trail import AuditWriter, broker_participant, record
from broker.store.tables import AuditRecord, AuditRecordPatient, table_of

RECORDS = table_of(AuditRecord)
PATIENTS = table_of(AuditRecordPatient)
BROKER = broker_participant("BROKER")


def _order(patient_id: str, accession: str = "A1") -> events.AuditEvent:
    return events.order_record("C", Source("RIS^HOSP", "10.0.0.9", "hl7"), BROKER, patient_id=patient_id,
                               accession_number=accession)


def _query(n: int) -> events.AuditEvent:
    return events.query(Source(f"MOD{n % 7}", "10.0.0.5", "dicom"), BROKER, what="1.2.840.10008.5.1.4.31",
                        query_bytes=b"\x08\x00\x50\x00" + str(n).encode(), patient_ids=(f"P{n}",) if n % 3 == 0 else ())


def _count(engine: Engine) -> int:
    with engine.connect() as db:
        return int(db.execute(select(func.count()).select_from(RECORDS)).scalar_one())


def test_record_commits_with_the_change_and_vanishes_with_its_rollback(engine: Engine) -> None:
    with engine.begin() as db:
        record(db, _order("P1"), datetime(2026, 12, 4, 10, 0))
    try:
        with engine.begin() as db:
            record(db, _order("P2"), datetime(2026, 12, 4, 10, 1))
            raise RuntimeError("the change fails")
    except RuntimeError:
        pass
    with engine.connect() as db:
        rows = db.execute(select(RECORDS)).mappings().all()
        patients = db.execute(select(PATIENTS.c.patient_id)).scalars().all()
    assert len(rows) == 1
    row = rows[0]
    assert (row["event_id"], row["action"], row["user_id"], row["host"]) == ("110109", "C", "RIS^HOSP", "10.0.0.9")
    assert row["delivered_at"] is None and row["attempts"] == 0
    assert row["recorded_at"] == datetime(2026, 12, 4, 10, 0)
    assert patients == ["P1"]
    assert from_json(row["event"]) == _order("P1")


def test_writer_commits_within_the_flush_interval_in_submission_order(engine: Engine) -> None:
    writer = AuditWriter(engine, 0.2)
    parts = [[_query(n) for n in range(start, start + 100)] for start in (0, 100, 200)]
    try:
        threads = [threading.Thread(target=lambda part=part: [writer.submit(e) for e in part]) for part in parts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 2.0
        while _count(engine) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _count(engine) == 300
    finally:
        writer.close()
    with engine.connect() as db:
        stored = [from_json(doc) for doc in db.execute(select(RECORDS.c.event).order_by(RECORDS.c.id)).scalars()]
        ids_for_p3 = db.execute(select(PATIENTS.c.record_id).where(PATIENTS.c.patient_id == "P3")).scalars().all()
    for part in parts:  # each thread's events in the order it submitted them
        assert [e for e in stored if e in part] == part
    assert len(stored) == 300
    assert len(ids_for_p3) == 1


def test_writer_close_flushes_what_is_queued(engine: Engine) -> None:
    writer = AuditWriter(engine, 60.0)
    for n in range(5):
        writer.submit(_query(n))
    writer.close()
    assert _count(engine) == 5


def test_writer_keeps_a_batch_the_database_refused(engine: Engine) -> None:
    writer = AuditWriter(engine, 60.0)
    try:
        writer.submit(_query(1))
        with engine.begin() as db:  # the table is gone for a moment: the insert fails
            db.exec_driver_sql("ALTER TABLE audit_record_patients RENAME TO audit_record_patients_away")
        writer.submit(_query(3))
        try:
            writer.flush()
            raise AssertionError("the flush should have failed")
        except AssertionError:
            raise
        except Exception:
            pass
        assert writer.queued == 2
        with engine.begin() as db:
            db.exec_driver_sql("ALTER TABLE audit_record_patients_away RENAME TO audit_record_patients")
        writer.flush()
        assert writer.queued == 0
    finally:
        writer.close()
    with engine.connect() as db:
        stored = [from_json(doc) for doc in db.execute(select(RECORDS.c.event).order_by(RECORDS.c.id)).scalars()]
    assert stored == [_query(1), _query(3)]
