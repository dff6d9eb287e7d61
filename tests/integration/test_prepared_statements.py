"""Prepared statements (broker.store.prepared) answer what Connection.execute answers, on both databases.

The hot path runs its statements on the driver; these tests hold it to SQLAlchemy's results: the
same rows (with JSON and DATETIME read back), the same stored values (JSON None, column defaults),
the same exceptions, and the same answer through the fallback for what it does not compile ahead.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import Engine, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, NoResultFound

from broker.store.prepared import Prepared
from broker.store.tables import Patient, table_of

pytestmark = pytest.mark.integration

PATIENTS = table_of(Patient)
BY_KEY = select(PATIENTS).where(PATIENTS.c.patient_id == bindparam("patient_id"),
                                PATIENTS.c.issuer == bindparam("issuer"))
NOW = datetime(2026, 12, 1, 8, 30, 15, 123456)


def patient(patient_id: str, **columns: object) -> dict[str, object]:
    return {"patient_id": patient_id, "issuer": "HOSP", "created_at": NOW, "updated_at": NOW,
            "attributes": {"00100020": {"vr": "LO", "Value": [patient_id]}}, **columns}


def test_rows_are_those_of_connection_execute(engine: Engine) -> None:
    prepared_insert = Prepared(insert(PATIENTS).returning(PATIENTS.c.id))
    with engine.begin() as db:
        first = prepared_insert.one(db, patient("P1", patient_name="DOE^JANE", sex="F"))[0]
        db.execute(insert(PATIENTS), patient("P2"))
    by_key = Prepared(BY_KEY)
    with engine.connect() as db:
        for patient_id in ("P1", "P2"):
            expected = db.execute(BY_KEY, {"patient_id": patient_id, "issuer": "HOSP"}).one()
            got = by_key.one(db, {"patient_id": patient_id, "issuer": "HOSP"})
            assert tuple(got) == tuple(expected)
            assert got.attributes == {"00100020": {"vr": "LO", "Value": [patient_id]}}
            assert got.created_at == NOW  # DATETIME read back as datetime on SQLite too
        assert by_key.first(db, {"patient_id": "P1", "issuer": "HOSP"}).id == first
        assert by_key.first(db, {"patient_id": "nobody", "issuer": "HOSP"}) is None
        assert by_key.scalar(db, {"patient_id": "nobody", "issuer": "HOSP"}) is None
        with pytest.raises(NoResultFound):
            by_key.one(db, {"patient_id": "nobody", "issuer": "HOSP"})
        assert [row.patient_id for row in Prepared(select(PATIENTS).order_by(PATIENTS.c.id)).all(db, {})] == [
            "P1", "P2"]


def test_left_out_columns_get_their_defaults_and_json_none_is_stored_as_sqlalchemy_stores_it(
        engine: Engine) -> None:
    prepared_insert = Prepared(insert(PATIENTS))
    with engine.begin() as db:
        # patient_name, birth_date and sex left out: their default is ''
        prepared_insert.rowcount(db, patient("P1", attributes=None))
        db.execute(insert(PATIENTS), patient("P2", attributes=None))
        rows = db.execute(select(PATIENTS.c.patient_name, PATIENTS.c.birth_date, PATIENTS.c.sex,
                                 PATIENTS.c.attributes.is_(None)).order_by(PATIENTS.c.id)).all()
    # SQLAlchemy stores a JSON None as the JSON text null, not as SQL NULL
    assert rows[0] == rows[1] == ("", "", "", False)


def test_update_counts_rows_and_uses_the_same_connection_transaction(engine: Engine) -> None:
    rename = Prepared(update(PATIENTS).where(PATIENTS.c.patient_id == bindparam("pid")))
    with engine.begin() as db:
        db.execute(insert(PATIENTS), [patient("P1"), patient("P2")])
        assert rename.rowcount(db, {"pid": "P1", "patient_name": "NEW^NAME"}) == 1
        assert rename.rowcount(db, {"pid": "nobody", "patient_name": "X"}) == 0
        # the change is visible to SQLAlchemy's own statements in the same transaction ...
        assert db.execute(select(PATIENTS.c.patient_name).where(PATIENTS.c.patient_id == "P1")).scalar() == (
            "NEW^NAME")
    with engine.begin() as db:
        rename.rowcount(db, {"pid": "P2", "patient_name": "ROLLED^BACK"})
        db.rollback()  # ... and rolled back with it
    with engine.connect() as db:
        names = db.execute(select(PATIENTS.c.patient_name).order_by(PATIENTS.c.id)).scalars().all()
    assert names == ["NEW^NAME", ""]


def test_driver_errors_are_sqlalchemy_errors(engine: Engine) -> None:
    prepared_insert = Prepared(insert(PATIENTS))
    with pytest.raises(IntegrityError), engine.begin() as db:
        prepared_insert.rowcount(db, patient("P1"))
        prepared_insert.rowcount(db, patient("P1"))  # (patient_id, issuer) is unique
    with engine.connect() as db:
        assert db.execute(select(PATIENTS)).all() == []


def test_statements_it_cannot_compile_ahead_run_through_sqlalchemy(engine: Engine) -> None:
    with engine.begin() as db:
        db.execute(insert(PATIENTS), [patient("P1"), patient("P2"), patient("P3")])
    # an expanding IN parameter is rendered per call by SQLAlchemy
    in_list = Prepared(select(PATIENTS.c.patient_id).where(PATIENTS.c.patient_id.in_(bindparam("ids")))
                       .order_by(PATIENTS.c.id))
    with engine.connect() as db:
        assert [row.patient_id for row in in_list.all(db, {"ids": ["P1", "P3"]})] == ["P1", "P3"]
        assert in_list.first(db, {"ids": ["P2"]}).patient_id == "P2"
