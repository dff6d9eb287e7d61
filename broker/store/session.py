"""Engine and session set-up for SQLite and PostgreSQL.

SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` transactions: the listener commits from
several threads (and later a worker process), and a deferred transaction that upgrades to a writer
can fail with "database is locked" without waiting; taking the write lock up front makes writers
queue instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def make_engine(database_url: str, *, pool_size: int = 10) -> Engine:
    """Create the engine for ``database_url``, creating the SQLite file's directory if needed."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=pool_size,
        )
        _configure_sqlite(engine)
        return engine
    # No pre-ping: it costs a round trip per checkout on the hot path. A dropped connection fails the
    # statement with OperationalError, which the intake retries on a fresh connection.
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=3600)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, issue BEGIN (see the "begin" hook below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (ACKs are built after it)."""
    return sessionmaker(engine, expire_on_commit=False)
