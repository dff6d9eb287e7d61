"""SQLite's one write lock shared by the broker's threads and its worker process: a writer waits for it
(polling every millisecond or two, not in SQLite's backing-off busy handler) instead of failing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import text

from broker.store.session import make_engine


def test_a_writer_waits_for_the_lock_held_by_another_connection_and_then_commits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    holder, waiter = make_engine(url, pool_size=1), make_engine(url, pool_size=1)
    with holder.begin() as db:
        db.execute(text("CREATE TABLE t (n INTEGER)"))
    released = threading.Event()
    outcome: list[object] = []

    def write() -> None:
        try:
            with waiter.begin() as db:  # BEGIN IMMEDIATE while the holder has the lock
                outcome.append(released.is_set())
                db.execute(text("INSERT INTO t VALUES (2)"))
        except Exception as exc:  # pragma: no cover - what the test is about
            outcome.append(exc)

    with holder.begin() as db:
        db.execute(text("INSERT INTO t VALUES (1)"))
        thread = threading.Thread(target=write)
        thread.start()
        time.sleep(0.3)
        assert outcome == []  # still waiting: the lock is held
        released.set()
    thread.join(10)
    assert outcome == [True]  # began only after the holder committed, and did not fail
    with holder.connect() as db:
        assert sorted(db.execute(text("SELECT n FROM t")).scalars()) == [1, 2]
    holder.dispose()
    waiter.dispose()
