"""Engine and session set-up for SQLite and PostgreSQL.

SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` transactions: the listener commits from
several threads (and later a worker process), and a deferred transaction that upgrades to a writer
can fail with "database is locked" without waiting; taking the write lock up front makes writers
queue instead.

Writers wait for the lock in :func:`_begin_immediate`, polling every millisecond or two, not in
SQLite's busy handler: that one sleeps 1, 2, 5, ... up to 100 ms between tries, so under steady
contention from two processes (the broker and its worker) a waiter that has backed off keeps losing to
fresh ones (measured: N-SET p99 0.7-1.1 s at p50 3-14 ms in the MPPS benchmark).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def _json_text(document: Any) -> str:
    return orjson.dumps(document).decode()


# Worklist items are JSON columns read on every C-FIND response and written on every order: orjson
# parses them about 4x faster than the json module (measured: 90 us -> 20 us for a worklist item).
JSON_CODEC: dict[str, Any] = {"json_serializer": _json_text, "json_deserializer": orjson.loads}


def make_engine(database_url: str, *, pool_size: int = 10, flush_with_next_commit: bool = False,
                for_reading: bool = False, plan_each_execution: bool = False) -> Engine:
    """Create the engine for ``database_url``, creating the SQLite file's directory if needed.

    ``flush_with_next_commit`` gives an engine whose commits do not wait for their own disk flush
    (PostgreSQL ``synchronous_commit=off`` in autocommit mode, SQLite ``synchronous=NORMAL``). Both
    databases write one log in order, so such a commit is on disk as soon as any later ordinary
    commit is: the intake archives a message this way and then commits its processing durably
    before the ACK. A crash in between loses at most a message that was never acknowledged.

    ``for_reading`` gives an engine for queries only (the worklist SCP): on SQLite its transactions
    begin deferred, so readers see a WAL snapshot and never take the write lock from the intake.

    ``plan_each_execution`` (PostgreSQL): statements run through SQLAlchemy are never prepared on the
    server (psycopg prepares after :data:`_PREPARE_ONLY_WHEN_ASKED` executions), so each is planned
    for its own values. Prepared on the server, PostgreSQL switches a statement to a generic plan
    after five executions, and a connection kept from the first minutes of a new database keeps the
    plan made when its tables were empty: an order lookup by placer OR filler number, ORDER BY id,
    walked the primary key of ``orders`` (measured: 3-5 ms per message at 10,000 orders, and
    growing). The hot path's statements (:mod:`broker.store.prepared`) are the exception: they ask
    to be prepared, are written so that any plan of theirs uses the indexes, and skip the planning
    that a plan per execution costs the server (measured: 0.5 ms of PostgreSQL CPU per HL7 order).
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
            pool_size=pool_size,
            max_overflow=pool_size,
            **JSON_CODEC,
        )
        _configure_sqlite(engine, "NORMAL" if flush_with_next_commit else "FULL",
                          "BEGIN" if for_reading else "BEGIN IMMEDIATE")
        return engine
    # No pre-ping: it costs a round trip per checkout on the hot path. A dropped connection fails the
    # statement with OperationalError, which the intake retries on a fresh connection.
    connect_args: dict[str, Any] = {"options": "-c synchronous_commit=off"} if flush_with_next_commit else {}
    if plan_each_execution:  # psycopg's None would not prepare even a statement that asks
        connect_args["prepare_threshold"] = _PREPARE_ONLY_WHEN_ASKED
    if flush_with_next_commit:
        return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=3600,
                             isolation_level="AUTOCOMMIT", connect_args=connect_args, **JSON_CODEC)
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=3600,
                         connect_args=connect_args, **JSON_CODEC)


def _configure_sqlite(engine: Engine, synchronous: str, begin: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, issue BEGIN (see the "begin" hook below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Readers (deferred BEGIN) keep SQLite's busy handler for the rare lock a WAL read can meet;
        # writers take the lock in BEGIN IMMEDIATE, where _begin_immediate does the waiting.
        cursor.execute(f"PRAGMA busy_timeout={0 if begin == 'BEGIN IMMEDIATE' else BUSY_TIMEOUT_MS}")
        cursor.close()

    def do_begin(dbapi_connection: Any) -> None:
        # Straight to the driver: exec_driver_sql costs ~50 us of CPU, twice per HL7 message. A
        # "database is locked" error is raised as OperationalError by SQLAlchemy, which wraps every
        # driver error of do_begin.
        driver = dbapi_connection.driver_connection
        if begin == "BEGIN IMMEDIATE":
            _begin_immediate(driver)
        else:
            driver.execute(begin)

    # The dialect's own BEGIN, not a "begin" event listener: one connection event listener makes
    # SQLAlchemy dispatch (empty) events around every statement of the engine, which cost ~15-20 us of
    # CPU per statement (measured), about a tenth of the CPU of an HL7 order's ten statements.
    engine.dialect.do_begin = do_begin  # type: ignore[method-assign]


# psycopg's prepare_threshold of the intake's engine: its own statements are prepared at the first
# execution (broker.store.prepared asks), all others never.
_PREPARE_ONLY_WHEN_ASKED = 2**62

# How long a writer waits for SQLite's write lock before its transaction fails ("database is locked").
BUSY_TIMEOUT_MS = 30000
# Between two tries for the write lock: short, so the lock passes on within a millisecond or two of
# its release; a try costs a few microseconds.
_LOCK_POLL_S = (0.0002, 0.0005, 0.001, 0.002)


def _begin_immediate(driver: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``, trying again every 0.2-2 ms while another connection holds the write lock,
    for up to :data:`BUSY_TIMEOUT_MS`."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    attempt = 0
    while True:
        try:
            driver.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() >= deadline:
                raise
        time.sleep(_LOCK_POLL_S[min(attempt, len(_LOCK_POLL_S) - 1)])
        attempt += 1


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (ACKs are built after it)."""
    return sessionmaker(engine, expire_on_commit=False)
