"""The node registry: which ``broker run`` processes of the cluster are live (``cluster_nodes``).

Each ``broker run`` is one node, named by ``node_id`` (default ``<host name>-<pid>``: a restarted
process is a new node). It joins when its listeners are up, beats every ``cluster_heartbeat_interval``
seconds from a thread, and leaves (``stopped_at``) when it stops cleanly. A node is live while it has
not left and its last heartbeat is younger than :data:`LIVE_HEARTBEATS` intervals, so a node that died
without leaving stops counting after about that long.

Joining and leaving are decided in the caller's transaction and serialized over the cluster (a
transaction-scoped advisory lock on PostgreSQL; SQLite's write transactions are serial anyway): the
UPS SCP Status Change rests on "am I the first live node" / "am I the last", and two nodes starting
or stopping at the same moment must not both believe it (see :mod:`broker.ups.service`).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, and_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from broker.cluster.leases import database_now, utc_now
from broker.config import Settings
from broker.store.tables import ClusterNode, table_of

log = structlog.get_logger(__name__)

NODES = table_of(ClusterNode)
LIVE_HEARTBEATS = 3
"""A node is live while its last heartbeat is younger than this many heartbeat intervals."""
MEMBERSHIP_LOCK = 0x42524B52  # "BRKR": the advisory lock that serializes joining and leaving


def node_id_for(settings: Settings) -> str:
    """This process's node id: ``node_id`` when set, else ``<host name>-<pid>``."""
    return settings.node_id or f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    host: str
    pid: int
    ae_title: str
    started_at: datetime
    heartbeat_at: datetime


def _ago(db: Connection, seconds: float) -> Any:
    if db.dialect.name == "postgresql":
        return database_now(db) - timedelta(seconds=seconds)
    return utc_now() - timedelta(seconds=seconds)


def live_nodes_in(db: Connection, within_seconds: float) -> list[NodeInfo]:
    """The nodes that have not left and beat within the last ``within_seconds``, by node id."""
    rows = db.execute(select(NODES.c.node_id, NODES.c.host, NODES.c.pid, NODES.c.ae_title, NODES.c.started_at,
                             NODES.c.heartbeat_at)
                      .where(NODES.c.stopped_at.is_(None), NODES.c.heartbeat_at >= _ago(db, within_seconds))
                      .order_by(NODES.c.node_id))
    return [NodeInfo(*row) for row in rows]


def live_nodes(engine: Engine, within_seconds: float) -> list[NodeInfo]:
    """:func:`live_nodes_in` on a connection of its own."""
    with engine.connect() as db:
        return live_nodes_in(db, within_seconds)


def _lock_membership(db: Connection) -> None:
    if db.dialect.name == "postgresql":
        db.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MEMBERSHIP_LOCK})")


class Node:
    """This process as a node of the cluster: :meth:`join`, the heartbeat thread, :meth:`leave`."""

    def __init__(self, engine: Engine, node_id: str, *, ae_title: str = "", heartbeat_interval: float = 5.0) -> None:
        self.engine = engine
        self.node_id = node_id
        self.ae_title = ae_title
        self.heartbeat_interval = heartbeat_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine) -> Node:
        return cls(engine, node_id_for(settings), ae_title=settings.ae_title,
                   heartbeat_interval=settings.cluster_heartbeat_interval)

    @property
    def live_within(self) -> float:
        return LIVE_HEARTBEATS * self.heartbeat_interval

    def others_in(self, db: Connection) -> list[NodeInfo]:
        return [node for node in live_nodes_in(db, self.live_within) if node.node_id != self.node_id]

    def join(self, db: Connection) -> bool:
        """Register this node as live (in the caller's transaction); returns whether no other node was
        live, i.e. the cluster was down and this node brings it back."""
        _lock_membership(db)
        alone = not self.others_in(db)
        self._upsert(db)
        log.info("cluster.node_joined", node_id=self.node_id, first=alone)
        return alone

    def leave(self, db: Connection) -> bool:
        """Mark this node stopped (in the caller's transaction); returns whether it was the last live node."""
        _lock_membership(db)
        last = not self.others_in(db)
        db.execute(update(NODES).where(NODES.c.node_id == self.node_id).values(stopped_at=database_now(db)))
        log.info("cluster.node_left", node_id=self.node_id, last=last)
        return last

    def _upsert(self, db: Connection) -> None:
        now = database_now(db)
        dialect_insert = postgresql.insert if db.dialect.name == "postgresql" else sqlite.insert
        statement = dialect_insert(NODES).values(node_id=self.node_id, host=socket.gethostname(), pid=os.getpid(),
                                                 ae_title=self.ae_title, started_at=now, heartbeat_at=now,
                                                 stopped_at=None)
        db.execute(statement.on_conflict_do_update(
            index_elements=[NODES.c.node_id],
            set_={"host": statement.excluded.host, "pid": statement.excluded.pid,
                  "ae_title": statement.excluded.ae_title, "started_at": statement.excluded.started_at,
                  "heartbeat_at": statement.excluded.heartbeat_at, "stopped_at": None}))

    def beat(self) -> None:
        """One heartbeat (registers the node again should its row have been deleted)."""
        with self.engine.begin() as db:
            updated = db.execute(update(NODES).where(and_(NODES.c.node_id == self.node_id,
                                                          NODES.c.stopped_at.is_(None)))
                                 .values(heartbeat_at=database_now(db))).rowcount
            if not updated and db.execute(select(NODES.c.node_id)
                                          .where(NODES.c.node_id == self.node_id)).first() is None:
                self._upsert(db)  # its row was deleted (by hand): a node that left stays left

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cluster-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                self.beat()
            except Exception as exc:  # the database is away: the next beat tries again
                log.warning("cluster.heartbeat_failed", node_id=self.node_id, error=type(exc).__name__)

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
