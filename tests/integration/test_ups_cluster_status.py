"""UPS SCP Status Change in a cluster (broker.cluster.nodes with broker.ups.service), on SQLite and
PostgreSQL: the subscribers hear RESTARTED only when a node starts with no other node live (the SCP, the
whole cluster, was down) and GOING DOWN only when the last live node stops; one node of several
starting or stopping tells them nothing. Nodes starting or stopping at the same moment decide one after
the other, so exactly one of them speaks. ``broker run`` end to end: test_ups_runtime."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest
from sqlalchemy import Engine, insert, select

from broker.cluster.nodes import Node, live_nodes
from broker.domain import ups_view as view
from broker.outbox.outbox import OUTBOX
from broker.store.tables import UpsSubscription, table_of
from broker.ups.service import UpsService

pytestmark = pytest.mark.integration


@pytest.fixture
def ups(engine: Engine) -> UpsService:
    with engine.begin() as db:
        db.execute(insert(table_of(UpsSubscription)).values(
            subscriber_ae="WATCHER", workitem_uid=view.GLOBAL_SUBSCRIPTION, is_global=True, deletion_lock=False,
            created_at=datetime.now()))
    return UpsService(engine)


def reports(engine: Engine) -> list[str]:
    """The SCP Status of every SCP Status Change queued so far, in order."""
    with engine.connect() as db:
        payloads = db.execute(select(OUTBOX.c.payload).where(OUTBOX.c.kind == "ups.event")
                              .order_by(OUTBOX.c.id)).scalars()
        return [payload["info"]["00741242"]["Value"][0] for payload in payloads if payload["event_type"] == 4]


def test_only_the_first_node_up_and_the_last_node_down_change_the_scp_status(engine: Engine, ups: UpsService) -> None:
    a, b = Node(engine, "node-a", heartbeat_interval=5), Node(engine, "node-b", heartbeat_interval=5)
    assert len(ups.scp_status_change("RESTARTED", a.join)) == 1  # the cluster was down
    assert ups.scp_status_change("RESTARTED", b.join) == []  # a is serving
    assert [node.node_id for node in live_nodes(engine, 15)] == ["node-a", "node-b"]
    assert ups.going_down(0, b.leave)  # a serves on: nothing to tell
    assert reports(engine) == ["RESTARTED"]
    b2 = Node(engine, "node-b2", heartbeat_interval=5)
    assert ups.scp_status_change("RESTARTED", b2.join) == []  # b back as a new node: a is serving
    assert ups.going_down(0, a.leave)
    assert reports(engine) == ["RESTARTED"]
    ups.going_down(0, b2.leave)  # the last one
    assert reports(engine) == ["RESTARTED", "GOING DOWN"]
    assert live_nodes(engine, 15) == []


def test_a_node_that_died_does_not_keep_the_scp_up(engine: Engine, ups: UpsService) -> None:
    dead = Node(engine, "dead", heartbeat_interval=0.1)
    ups.scp_status_change("RESTARTED", dead.join)
    assert [node.node_id for node in live_nodes(engine, 0.3)] == ["dead"]
    time.sleep(0.5)  # three heartbeats missed: no longer live
    alive = Node(engine, "alive", heartbeat_interval=0.1)
    alive.start_heartbeat()
    try:
        assert len(ups.scp_status_change("RESTARTED", alive.join)) == 1
        time.sleep(0.5)  # its heartbeat keeps it live
        assert [node.node_id for node in live_nodes(engine, 0.3)] == ["alive"]
    finally:
        alive.stop_heartbeat()
    assert reports(engine) == ["RESTARTED", "RESTARTED"]


@pytest.mark.parametrize("change", ["start", "stop"])
def test_nodes_starting_or_stopping_at_once_speak_once(engine: Engine, ups: UpsService, change: str) -> None:
    nodes = [Node(engine, f"node-{n}", heartbeat_interval=5) for n in range(4)]
    if change == "stop":
        for node in nodes:
            ups.scp_status_change("RESTARTED", node.join)
    before = len(reports(engine))
    barrier = threading.Barrier(len(nodes))

    def run(node: Node) -> None:
        barrier.wait()
        if change == "start":
            ups.scp_status_change("RESTARTED", node.join)
        else:
            ups.going_down(0, node.leave)

    threads = [threading.Thread(target=run, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert reports(engine)[before:] == ["RESTARTED" if change == "start" else "GOING DOWN"]
