"""Two broker nodes (``broker run`` processes) and two Celery workers on one PostgreSQL database and one
Redis: what one node does, the other sees and continues, as if there were one broker. The tests talk to
each node's own ports (not through HAProxy) so that they choose which node gets which request.

One cluster serves the whole module (no test here kills a node); each test uses orders of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]
from sqlalchemy import func, select

from broker.domain.ups_identity import derived_ups_uid
from broker.hl7.message import parse
from broker.hl7.mllp_client import MLLPClient
from broker.store.tables import InboundMessage, OutboxEvent, ScheduledStep, StepTransition, table_of
from tests.cluster_support import TOKEN, Cluster, Node, running_cluster, wait_until
from tests.conftest import module_database
from tests.events_support import TestRis, mpps_create, mpps_final
from tests.hl7_support import ack_of
from tests.integration.test_ups_events import Subscriber
from tests.integration.test_ups_scp import (
    CHANGE_STATE,
    GLOBAL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    action,
    change_state,
    final_attributes,
    n_set,
    ups_scu,
)
from tests.live_support import read_procedure_events
from tests.mwl_support import Order, omi

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
STEPS = table_of(ScheduledStep)
MESSAGES = table_of(InboundMessage)
TRANSITIONS = table_of(StepTransition)


@pytest.fixture(scope="module")
def ris() -> Iterator[TestRis]:
    server = TestRis()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def subscriber() -> Iterator[Subscriber]:
    started = Subscriber("CLUSTERSUB").start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, ris: TestRis, subscriber: Subscriber) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    for url in module_database("postgresql", tmp_path_factory, "cluster"):
        with running_cluster(url, workdir, nodes=2, workers=2, haproxy=False,
                             ris_hl7_address=f"127.0.0.1:{ris.port}", dicom_peers=subscriber.peer()) as running:
            try:
                yield running
            except BaseException:
                print(running.logs())
                raise


def send(node: Node, message: bytes) -> bytes:
    with MLLPClient("127.0.0.1", node.hl7_port, timeout=30) as client:
        return client.send(message)


def msa(reply: bytes) -> tuple[str, ...]:
    """The MSA segment of an ACK, field by field."""
    ack = ack_of(reply, "utf-8")
    return tuple(ack.value(ack.first("MSA"), n) for n in range(1, 4))


def step(cluster: Cluster, sps_id: str) -> Any:
    with cluster.engine.connect() as db:
        return db.execute(select(STEPS).where(STEPS.c.sps_id == sps_id)).one()


# --- HL7 ----------------------------------------------------------------------------------------------

def test_the_same_message_at_both_nodes_at_once_is_stored_once_with_one_ack(cluster: Cluster) -> None:
    """A RIS that fails over while its message is in flight sends the same MSH-10 to the other node: both
    nodes answer the same ACK, the order exists once, and the archive holds it once as the original."""
    node1, node2 = cluster.nodes
    orders = [Order(sps=f"DUP{n}", station="CT01") for n in range(12)]
    for order in orders:
        message = omi(order)
        gate = threading.Barrier(2)

        def at(node: Node, message: bytes = message, gate: threading.Barrier = gate) -> bytes:
            gate.wait()
            return send(node, message)

        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(at, [node1, node2])
        assert msa(first) == msa(second), (first, second)
        assert msa(first)[0] == "AA"
        with cluster.engine.connect() as db:
            archived = db.execute(select(MESSAGES.c.status, MESSAGES.c.duplicate_of_id)
                                  .where(MESSAGES.c.control_id == f"{order.sps}NW")).all()
            steps = db.execute(select(STEPS.c.id).where(STEPS.c.sps_id == order.sps)).all()
        # one original; the copy that arrived while it was unanswered may have answered it in its place
        # (then it stores no row of its own), or it waited and was archived as its duplicate
        assert [status for status, _ in archived if status != "duplicate"] == ["accepted"]
        assert len(steps) == 1


def test_changes_of_one_order_at_alternate_nodes_apply_in_sending_order(cluster: Cluster) -> None:
    """Each order's messages go to alternate nodes, the next one as soon as the previous is ACKed, many
    orders in parallel: every order ends in the state of its last message."""
    node1, node2 = cluster.nodes
    cancelled = [Order(sps=f"SEQC{n}", station="CT01") for n in range(10)]
    completed = [Order(sps=f"SEQD{n}", station="CT01") for n in range(10)]

    def run(order: Order, changes: list[tuple[Node, str, str]]) -> None:
        assert msa(send(node1 if changes[0][0] is node2 else node2, omi(order)))[0] == "AA"
        for n, (node, control, status) in enumerate(changes):
            reply = send(node, omi(order, control, status, control_id=f"{order.sps}-{n}"))
            assert msa(reply)[0] == "AA", reply

    with ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(run, order, [(node2, "CA", "CA")]) for order in cancelled]
        jobs += [pool.submit(run, order, [(node1, "XO", "SC"), (node2, "SC", "IP"), (node1, "SC", "CM")])
                 for order in completed]
        for job in jobs:
            job.result()
    assert {o.sps: step(cluster, o.sps).sps_status for o in cancelled} == {o.sps: "CANCELED" for o in cancelled}
    assert {o.sps: step(cluster, o.sps).sps_status for o in completed} == {o.sps: "COMPLETED" for o in completed}


# --- DICOM: UPS and MPPS across nodes ------------------------------------------------------------------

def test_a_ups_claimed_on_one_node_is_completed_on_the_other_and_subscribers_hear_both(
        cluster: Cluster, subscriber: Subscriber) -> None:
    node1, node2 = cluster.nodes
    watcher = ups_scu(node1.dicom_port, "WATCHER")
    try:
        assert int(action(watcher, GLOBAL, SUBSCRIBE, ReceivingAE=subscriber.ae_title,
                          DeletionLock="FALSE").Status) == 0
    finally:
        watcher.release()
    try:
        order = Order(sps="UPSX1", station="CT01")
        assert msa(send(node2, omi(order)))[0] == "AA"
        row = step(cluster, order.sps)
        uid = derived_ups_uid(row.study_instance_uid, row.sps_id)
        transaction = str(generate_uid())
        first = ups_scu(node1.dicom_port, "CT01")
        try:
            assert change_state(first, uid, "IN PROGRESS", transaction) == 0x0000
        finally:
            first.release()
        second = ups_scu(node2.dicom_port, "CT01")
        try:
            assert n_set(second, uid, final_attributes(transaction)) == 0x0000
            assert change_state(second, uid, "COMPLETED", transaction) == 0x0000
            # the other node knows the workitem is final: a second completion is refused
            assert int(action(second, uid, CHANGE_STATE, ProcedureStepState="COMPLETED",
                              TransactionUID=transaction).Status) != 0x0000
        finally:
            second.release()
        assert step(cluster, order.sps).sps_status == "COMPLETED"
        assert subscriber.wait_for(3, uid) == [(1, "SCHEDULED"), (1, "IN PROGRESS"), (1, "COMPLETED")]
    finally:
        watcher = ups_scu(node2.dicom_port, "WATCHER")
        try:
            action(watcher, GLOBAL, UNSUBSCRIBE, ReceivingAE=subscriber.ae_title)
        finally:
            watcher.release()


def at_both_nodes_at_once(cluster: Cluster, call: Any) -> list[Any]:
    """``call(node)`` for both nodes in two threads released together; the results in node order."""
    gate = threading.Barrier(2)

    def one(node: Node) -> Any:
        gate.wait()
        return call(node)

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, cluster.nodes))


def test_two_modalities_claiming_one_ups_at_two_nodes_at_once_one_wins(cluster: Cluster) -> None:
    """Two stations pull the same workitem at the same moment through different nodes: exactly one claim
    succeeds, the other is told the UPS is already in progress (C302), and the step was started once."""
    node1, _ = cluster.nodes
    for n in range(6):
        order = Order(sps=f"RACE{n}", station="CT01")
        assert msa(send(node1, omi(order)))[0] == "AA"
        row = step(cluster, order.sps)
        uid = derived_ups_uid(row.study_instance_uid, row.sps_id)

        def claim(node: Node, uid: str = uid) -> int:
            assoc = ups_scu(node.dicom_port, "CT01")
            try:
                return change_state(assoc, uid, "IN PROGRESS", str(generate_uid()))
            finally:
                assoc.release()

        outcomes = at_both_nodes_at_once(cluster, claim)
        assert sorted(outcomes) == [0x0000, 0xC302], [hex(o) for o in outcomes]
        with cluster.engine.connect() as db:
            started = db.execute(select(func.count()).select_from(TRANSITIONS).where(
                TRANSITIONS.c.step_fk == row.id, TRANSITIONS.c.to_status == "STARTED")).scalar_one()
        assert started == 1


def test_one_mpps_created_at_two_nodes_at_once_is_stored_once(cluster: Cluster) -> None:
    """A modality that repeats an N-CREATE through the other node while the first is in flight: one is
    stored (0000), the other is a duplicate SOP instance (0111), never a processing failure."""
    node1, _ = cluster.nodes
    for n in range(6):
        order = Order(sps=f"MRACE{n}", station="CT01")
        assert msa(send(node1, omi(order)))[0] == "AA"
        row = step(cluster, order.sps)
        uid = str(generate_uid())
        outcomes = at_both_nodes_at_once(
            cluster, lambda node, row=row, uid=uid: mpps(node, uid, mpps_create(row.study_instance_uid, row.sps_id),
                                                         create=True))
        assert sorted(outcomes) == [0x0000, 0x0111], [hex(o) for o in outcomes]


def mpps_scu(node: Node) -> Any:
    ae = AE(ae_title="CT01")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="BROKER")
    assert assoc.is_established
    return assoc


def mpps(node: Node, uid: str, dataset: Dataset, create: bool) -> int:
    assoc = mpps_scu(node)
    try:
        if create:
            status, _ = assoc.send_n_create(dataset, ModalityPerformedProcedureStep, uid)
        else:
            status, _ = assoc.send_n_set(dataset, ModalityPerformedProcedureStep, uid)
        assert status, "no MPPS response"
        return int(status.Status)
    finally:
        assoc.release()


def test_mpps_across_nodes_and_the_ris_gets_each_status_once_in_order(cluster: Cluster, ris: TestRis) -> None:
    """N-CREATE on one node, N-SET COMPLETED on the other, for many orders at once: both nodes' relays and
    both workers run, and the RIS gets IP then CM for each order, each message once."""
    node1, node2 = cluster.nodes
    orders = [Order(sps=f"MPPS{n}", station="CT01") for n in range(12)]
    for order in orders:
        assert msa(send(node1, omi(order)))[0] == "AA"
    ours = {f"PL{o.sps}" for o in orders}  # the RIS also gets the statuses of the other tests' orders

    def perform(n: int, order: Order) -> None:
        row = step(cluster, order.sps)
        created, updated = (node1, node2) if n % 2 == 0 else (node2, node1)
        uid = str(generate_uid())
        assert mpps(created, uid, mpps_create(row.study_instance_uid, row.sps_id), create=True) == 0x0000
        assert mpps(updated, uid, mpps_final(), create=False) == 0x0000

    with ThreadPoolExecutor(4) as pool:
        for job in [pool.submit(perform, n, order) for n, order in enumerate(orders)]:
            job.result()
    assert {step(cluster, o.sps).sps_status for o in orders} == {"COMPLETED"}
    outbox = table_of(OutboxEvent)

    def received() -> tuple[dict[str, list[str]], list[str]]:
        """Our orders' ORC-5 values in arrival order, and the control IDs of every status so far."""
        arrived: dict[str, list[str]] = {}
        control_ids = []
        for text in list(ris.messages):
            message = parse(text)
            control_ids.append(message.value(message.msh, 10))
            placer = message.value(message.first("ORC"), 2, 1)
            if placer in ours:
                arrived.setdefault(placer, []).append(message.value(message.first("ORC"), 5))
        return arrived, control_ids

    def delivered() -> bool:
        with cluster.engine.connect() as db:
            statuses = db.execute(select(outbox.c.status).where(outbox.c.kind == "ris.status")).scalars().all()
        return sum(map(len, received()[0].values())) >= 2 * len(orders) and set(statuses) == {"done"}

    wait_until(delivered, 30, "every status delivered")
    time.sleep(1.0)  # a status sent twice would arrive now
    arrived, control_ids = received()
    assert len(control_ids) == len(set(control_ids)), "a status message reached the RIS twice"
    assert arrived == {f"PL{o.sps}": ["IP", "CM"] for o in orders}


# --- the board's live stream --------------------------------------------------------------------------

def test_the_live_stream_of_one_node_shows_a_change_made_on_the_other(cluster: Cluster) -> None:
    node1, node2 = cluster.nodes
    received: list[dict[str, Any]] = []
    connected, arrived = threading.Event(), threading.Event()
    order = Order(sps="LIVE1", station="CT01")
    with httpx.Client(timeout=httpx.Timeout(5, read=60)) as client, \
            client.stream("GET", f"http://127.0.0.1:{node2.http_port}/api/stream",
                          params={"token": TOKEN}) as response:
        assert response.status_code == 200
        reader = threading.Thread(target=read_procedure_events, args=(response, received, connected, arrived),
                                  daemon=True)
        reader.start()
        assert connected.wait(30)
        assert msa(send(node1, omi(order)))[0] == "AA"
        wait_until(lambda: any(p["accession_number"] == "ALIVE1" for p in received), 30, "the new order")
        assert msa(send(node1, omi(order, "CA", "CA", control_id="LIVE1-CA")))[0] == "AA"
        wait_until(lambda: any(p["accession_number"] == "ALIVE1" and p["state"] == "CANCELED" for p in received),
                   30, "the cancellation")
        response.close()
