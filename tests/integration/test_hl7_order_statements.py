"""What a new order costs the database, and that the cheaper paths store what the general one does.

A new order of one step is the message the intake sees most; on PostgreSQL every statement is a
network round trip, so the order's rows (and a new patient's row) go in one statement there, and on
SQLite new keys come from lastrowid instead of RETURNING.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, event, select, text

from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.store import migrate
from broker.store.session import make_engine
from broker.store.tables import Order, Patient, RequestedProcedure, ScheduledStep, StepTransition, table_of
from tests.conftest import sample
from tests.hl7_support import msa_code, with_control_id

pytestmark = pytest.mark.integration

NEW = sample("orm_o01_new.hl7")


# Transaction control is not counted: only the statements that read or write rows.
_NOT_COUNTED = {"BEGIN", "COMMIT", "ROLLBACK", "PRAGMA", "SAVEPOINT", "RELEASE"}


@pytest.fixture
def statements(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Statements the driver sends, by first word: counted at the driver, since the hot path's
    statements (broker.store.prepared) bypass SQLAlchemy's execution events."""
    counter: Counter[str] = Counter()

    def count(statement: str) -> None:
        word = statement.split(None, 1)[0].upper()
        if word not in _NOT_COUNTED and not word.startswith("--"):
            counter[word] += 1

    if engine.dialect.name == "sqlite":
        engine.dispose()  # connections opened from now on trace their statements

        def trace(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.set_trace_callback(count)

        event.listen(engine, "connect", trace)
        yield counter
        event.remove(engine, "connect", trace)
        return
    execute = psycopg.Cursor.execute

    def counting(cursor: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        count(query if isinstance(query, str) else query.decode() if isinstance(query, bytes) else str(query))
        return execute(cursor, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", counting)
    yield counter


def second_order(control_id: str) -> bytes:
    """The sample order again with new order numbers and step keys (same patient)."""
    return (with_control_id(NEW, control_id).replace(b"PO-77001", b"PO-77002").replace(b"FO-77001", b"FO-77002")
            .replace(b"ACC77001", b"ACC77002").replace(b"SPS77001", b"SPS77002").replace(b"RP77001", b"RP77002")
            .replace(b"543.77001", b"543.77002"))


def test_new_patient_and_order_rows(engine: Engine, mappings: MappingSet, statements: Counter[str]) -> None:
    intake = Intake(engine, mappings)
    assert msa_code(intake.handle(NEW)[0]) == "AA"
    # archive insert; lookup; the order's rows (with the new patient on PostgreSQL); outcome update
    expected = {"postgresql": {"INSERT": 1, "SELECT": 1, "WITH": 1, "UPDATE": 1},
                "sqlite": {"INSERT": 6, "SELECT": 1, "UPDATE": 1}}[engine.dialect.name]
    assert dict(statements) == expected
    assert msa_code(intake.handle(second_order("RIS000102"))[0]) == "AA"
    with engine.connect() as db:
        [patient] = db.execute(select(table_of(Patient))).all()
        orders = db.execute(select(table_of(Order)).order_by(table_of(Order).c.id)).all()
        procedures = db.execute(select(table_of(RequestedProcedure))).all()
        steps = db.execute(select(table_of(ScheduledStep)).order_by(table_of(ScheduledStep).c.id)).all()
        transitions = db.execute(select(table_of(StepTransition))).all()
    assert (patient.patient_id, patient.issuer, patient.sex, patient.birth_date) == ("MRN4711", "GENHOSP", "F",
                                                                                    "19620412")
    assert patient.patient_name.startswith("M") and patient.merged_into_id is None
    assert patient.attributes["00100020"]["Value"] == ["MRN4711"]
    assert [o.patient_fk for o in orders] == [patient.id, patient.id]
    assert [s.patient_fk for s in steps] == [patient.id, patient.id]
    assert {p.order_fk for p in procedures} == {o.id for o in orders}
    assert {s.procedure_fk for s in steps} == {p.id for p in procedures}
    assert sorted(t.step_fk for t in transitions) == [s.id for s in steps]
    assert [s.patient_name for s in steps] == [patient.patient_name] * 2


def _order_reads(engine: Engine, orders_stored: int) -> int:
    """Rows of ``orders`` read so far by sequential and index scans, once the statistics of the
    closed connections (flushed as their server processes exit) count ``orders_stored`` inserts."""
    for _ in range(100):
        with engine.connect() as db:
            row = db.execute(text("SELECT n_tup_ins, coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) "
                                  "AS reads FROM pg_stat_user_tables WHERE relname = 'orders'")).one()
        if row.n_tup_ins >= orders_stored:
            return int(row.reads)
        time.sleep(0.1)
    raise AssertionError(f"the statistics never counted {orders_stored} orders")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgresql_order_lookup_reads_no_other_orders(database_url: str, mappings: MappingSet) -> None:
    """A new order's lookup reads no order but a match, also once its plan was made for no particular
    values while the tables were nearly empty (PostgreSQL's generic plan of a prepared statement,
    used from the sixth execution on a connection kept by the intake): an ORDER BY id ... LIMIT 1 over
    an OR of the two order numbers walked the primary key through every order (see make_engine)."""
    engine = make_engine(database_url, plan_each_execution=True)
    migrate.upgrade(engine)

    def place(numbers: range) -> list[str]:
        """Place the orders; returns the statements prepared on the intake's connection."""
        intake = Intake(engine, mappings)
        for number in numbers:
            order = (with_control_id(NEW, f"RIS{number:06d}").replace(b"PO-77001", b"PO-%d" % number)
                     .replace(b"FO-77001", b"FO-%d" % number).replace(b"SPS77001", b"SPS-%d" % number))
            assert msa_code(intake.handle(order)[0]) == "AA"
        intake.close()
        with engine.connect() as db:  # the intake's one connection, back in the pool
            prepared = list(db.execute(text("SELECT statement FROM pg_prepared_statements")).scalars())
        engine.dispose()  # the server processes exit and flush their table statistics
        return prepared

    place(range(20))  # the plans are made now, on tables of a few rows
    before = _order_reads(engine, 20)
    prepared = place(range(20, 420))  # the same plans on one kept connection, as the tables grow
    reads = _order_reads(engine, 420) - before
    engine.dispose()
    # The lookup is prepared: planned once, not for each message ...
    assert any("FROM orders" in statement for statement in prepared), prepared
    # ... and yet reads no other order.
    # One read per order is the foreign key check of its procedure's row; a scan reads hundreds.
    assert reads <= 2 * 400, f"400 new orders read {reads} rows of orders"
