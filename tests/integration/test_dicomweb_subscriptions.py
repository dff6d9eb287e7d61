"""UPS-RS subscriptions and the WebSocket subscription channel (PS3.18 11.10-11.13, 8.10.4), on SQLite and
PostgreSQL, against a real broker: the HTTP server (uvicorn, as ``broker run`` runs it), the DICOM AE
and the event path (relay + in-process worker) on one database.

Outside clients all the way: httpx for the UPS-RS transactions, the ``websockets`` library for the
channel, pynetdicom for the DIMSE changes and for a DIMSE subscriber of the same workitems. Covered:
every transaction and its error statuses with their Warning; the channel's reports as DICOM JSON that
pydicom reads; the same reports in the same order over the WebSocket as over DIMSE, for changes made
over DIMSE and over UPS-RS; a channel closed while changes go on gets what it missed on reconnection,
in order, once; a second channel takes over; tokens (read role; a channel without a valid token is
refused before the upgrade and recorded as a Security Alert); the relay never publishes a WebSocket
report; and one channel per AE across two nodes on one PostgreSQL database.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import orjson
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import Association
from sqlalchemy import Engine, select
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from broker.audit.events import SECURITY_ALERT
from broker.cluster.leases import holder_of
from broker.config import Settings, load_settings
from broker.domain import ups_notify
from broker.events.relay import Relay
from broker.events.wiring import EventPath
from broker.outbox import consumer
from broker.store.tables import AuditRecord, OutboxEvent, UpsSubscription, table_of
from broker.web.dicomweb.channel import TAKEN_OVER, lease_name
from tests.dicom_support import dicom_server, free_port, wait_until
from tests.events_support import rows
from tests.integration.test_ups_events import Subscriber
from tests.integration.test_ups_scp import (
    FILTERED_GLOBAL,
    GLOBAL,
    SUBSCRIBE,
    action,
    change_state,
    create,
    final_attributes,
    n_set,
    progress,
    ups_scu,
    workitem,
)
from tests.web_support import WebServerThread, web_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

READ = "read-token-subscriber-0123"
WRITE = "write-token-subscriber-0123"
AUDITOR = "audit-token-subscriber-0123"
AS_READER = {"Authorization": f"Bearer {READ}"}
AS_WRITER = {"Authorization": f"Bearer {WRITE}"}
DICOM_JSON = "application/dicom+json"
STATE, EVENT_TYPE, AFFECTED = "00741000", "00001002", "00001000"


@dataclass
class Broker:
    engine: Engine
    settings: Settings
    dicom_port: int
    http: httpx.Client
    web_port: int
    watcher: Subscriber

    def ws_url(self, ae: str, port: int | None = None, **query: str) -> str:
        tail = "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
        return f"ws://127.0.0.1:{port or self.web_port}/dicomweb/subscribers/{ae}{tail}"

    def channel(self, ae: str, token: str = READ, port: int | None = None) -> ClientConnection:
        return connect(self.ws_url(ae, port), additional_headers={"Authorization": f"Bearer {token}"},
                       open_timeout=20)

    def subscribe(self, uid: str, ae: str, query: str = "", token: str = READ) -> httpx.Response:
        return self.http.post(f"/dicomweb/workitems/{uid}/subscribers/{ae}{query}",
                              headers={"Authorization": f"Bearer {token}"})


def broker_settings(database_url: str, peers: str, **extra: Any) -> Settings:
    return load_settings(database_url=database_url, redis_url="", dicom_host="127.0.0.1", dicom_port=free_port(),
                         dicom_peers=peers, http_host="127.0.0.1", http_port=free_port(),
                         api_tokens=f"{READ}:read,{WRITE}:write,{AUDITOR}:audit", audit_enabled=True,
                         audit_flush_interval=0.05, event_poll_interval=0.1, event_backoff_base=0.5,
                         event_backoff_max=2, **extra)


@pytest.fixture
def broker(engine: Engine, database_url: str) -> Iterator[Broker]:
    watcher = Subscriber("WATCHER").start()
    settings = broker_settings(database_url, f"{watcher.peer()},PERFORMER@127.0.0.1:9")
    path = EventPath.start(settings, engine)
    try:
        with dicom_server(settings, database_url, path.workflow) as dicom, web_server(settings) as web, \
                httpx.Client(base_url=f"http://127.0.0.1:{web.server.port}", timeout=20) as http:
            yield Broker(engine, settings, dicom.port, http, web.server.port, watcher)
    finally:
        path.stop()
        watcher.stop()


@pytest.fixture
def scu(broker: Broker) -> Iterator[Association]:
    assoc = ups_scu(broker.dicom_port, "PERFORMER")
    yield assoc
    assoc.release()


# --- the channel's client side -----------------------------------------------------------------------

def receive(ws: ClientConnection, count: int, seconds: float = 20) -> list[Dataset]:
    """``count`` reports from the channel, each checked to be one DICOM JSON dataset pydicom reads."""
    got: list[Dataset] = []
    deadline = time.monotonic() + seconds
    while len(got) < count:
        message = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        assert isinstance(message, str)  # a text frame (PS3.18 8.10.5.1.1)
        got.append(Dataset.from_json(orjson.loads(message)))
    return got


def nothing_more(ws: ClientConnection, seconds: float = 0.8) -> None:
    with pytest.raises(TimeoutError):
        ws.recv(timeout=seconds)


def summary(reports: list[Dataset]) -> list[tuple[int, str, str]]:
    """(Event Type ID, workitem, Procedure Step State or '') of each report."""
    return [(int(r.EventTypeID), str(r.AffectedSOPInstanceUID), str(r.get("ProcedureStepState", "")))
            for r in reports]


def dimse_summary(subscriber: Subscriber, uids: set[str]) -> list[tuple[int, str, str]]:
    with subscriber.lock:
        return [(r.event_type, r.uid, str(r.info.get("ProcedureStepState", ""))) for r in subscriber.received
                if r.uid in uids]


def state_body(state: str, transaction_uid: str) -> bytes:
    ds = Dataset()
    ds.ProcedureStepState = state
    ds.TransactionUID = transaction_uid
    return orjson.dumps([ds.to_json_dict()])


def ups_rs(http: httpx.Client, method: str, path: str, dataset: Dataset | None = None) -> httpx.Response:
    content = orjson.dumps([dataset.to_json_dict()]) if dataset is not None else None
    return http.request(method, f"/dicomweb{path}", content=content,
                        headers={**AS_WRITER, **({"Content-Type": DICOM_JSON} if content else {})})


# --- the transactions --------------------------------------------------------------------------------

def test_subscribe_answers_201_with_the_channel_and_stores_a_websocket_subscription(broker: Broker,
                                                                                  scu: Association) -> None:
    uid = str(generate_uid())
    assert create(scu, workitem("CT HEAD"), uid) == 0
    answer = broker.subscribe(uid, "WSSUB", "?deletionlock=true")
    assert answer.status_code == 201, answer.text
    assert answer.headers["content-location"] == broker.ws_url("WSSUB")
    [subscription] = rows(broker.engine, UpsSubscription, subscriber_ae="WSSUB")
    assert (subscription.workitem_uid, subscription.deletion_lock, subscription.channel) == (uid, True, "websocket")
    # the AE title need not be a DICOM peer: its reports go over its channel
    assert broker.subscribe(GLOBAL, "NOT A PEER").status_code == 201
    assert broker.subscribe(FILTERED_GLOBAL, "FILTERED", "?ProcedureStepLabel=MR*&deletionlock=false").status_code \
        == 201
    [filtered] = rows(broker.engine, UpsSubscription, subscriber_ae="FILTERED")
    assert filtered.matching_keys == {"00741204": {"vr": "LO", "Value": ["MR*"]}}
    # a write token may subscribe too (the read role is the least it needs)
    assert broker.subscribe(uid, "WRITER", token=WRITE).status_code == 201


@pytest.mark.parametrize(("path", "query", "status", "warning"), [
    ("1.2.3.404", "", 404, "The Target Workitem was not found."),
    ("not-a-uid", "", 400, "is not a UID"),
    ("{uid}", "?deletionlock=maybe", 400, "deletionlock must be true or false"),
    ("{uid}", "?ProcedureStepLabel=CT*", 400, "only for the filtered global subscription"),
    (FILTERED_GLOBAL, "?NoSuchKeyword=1", 400, "unknown attribute"),
    (FILTERED_GLOBAL, "?limit=3", 400, "not one of a subscription"),
])
def test_subscribe_refusals(broker: Broker, scu: Association, path: str, query: str, status: int,
                            warning: str) -> None:
    uid = str(generate_uid())
    assert create(scu, workitem(), uid) == 0
    answer = broker.subscribe(path.format(uid=uid), "WSSUB", query)
    assert answer.status_code == status, answer.text
    assert answer.headers["warning"].startswith("299 ") and warning in answer.headers["warning"]
    assert rows(broker.engine, UpsSubscription, subscriber_ae="WSSUB") == []


def test_an_ae_title_that_is_none_is_refused(broker: Broker) -> None:
    for bad in ("SEVENTEEN_CHARS_X", "BACK%5CSLASH", "%20%20"):
        answer = broker.subscribe(GLOBAL, bad)
        assert answer.status_code == 400, (bad, answer.text)
        assert "is not an AE title" in answer.headers["warning"]


def test_unsubscribe_and_suspend(broker: Broker, scu: Association) -> None:
    uid = str(generate_uid())
    assert create(scu, workitem(), uid) == 0
    http = broker.http
    # nothing to end yet: 404, the subscription is not there
    for answer in (http.delete(f"/dicomweb/workitems/{uid}/subscribers/WSSUB", headers=AS_READER),
                   http.delete(f"/dicomweb/workitems/{GLOBAL}/subscribers/WSSUB", headers=AS_READER),
                   http.post(f"/dicomweb/workitems/{GLOBAL}/subscribers/WSSUB/suspend", headers=AS_READER)):
        assert answer.status_code == 404, answer.text
        assert answer.headers["warning"].endswith(": The target Subscription was not found.")
    # suspend is for the global subscriptions only
    answer = http.post(f"/dicomweb/workitems/{uid}/subscribers/WSSUB/suspend", headers=AS_READER)
    assert answer.status_code == 400 and "global" in answer.headers["warning"]
    assert broker.subscribe(uid, "WSSUB").status_code == 201
    assert broker.subscribe(GLOBAL, "WSSUB").status_code == 201
    assert http.post(f"/dicomweb/workitems/{GLOBAL}/subscribers/WSSUB/suspend", headers=AS_READER).status_code == 200
    [suspended] = [s for s in rows(broker.engine, UpsSubscription, subscriber_ae="WSSUB") if s.is_global]
    assert suspended.suspended_at is not None
    assert http.delete(f"/dicomweb/workitems/{uid}/subscribers/WSSUB", headers=AS_READER).status_code == 200
    assert [s.workitem_uid for s in rows(broker.engine, UpsSubscription, subscriber_ae="WSSUB")] == [GLOBAL]
    # the global UID ends every subscription of the AE (PS3.4 CC.2.3.2)
    assert broker.subscribe(uid, "WSSUB").status_code == 201
    assert http.delete(f"/dicomweb/workitems/{GLOBAL}/subscribers/WSSUB", headers=AS_READER).status_code == 200
    assert rows(broker.engine, UpsSubscription, subscriber_ae="WSSUB") == []


def test_tokens(broker: Broker, scu: Association) -> None:
    uid = str(generate_uid())
    assert create(scu, workitem(), uid) == 0
    http = broker.http
    assert http.post(f"/dicomweb/workitems/{uid}/subscribers/WSSUB").status_code == 401
    assert broker.subscribe(uid, "WSSUB", token="wrong-token").status_code == 401
    assert broker.subscribe(uid, "WSSUB", token=AUDITOR).status_code == 403
    assert http.delete(f"/dicomweb/workitems/{uid}/subscribers/WSSUB").status_code == 401
    assert http.post(f"/dicomweb/workitems/{GLOBAL}/subscribers/WSSUB/suspend").status_code == 401
    assert rows(broker.engine, UpsSubscription, subscriber_ae="WSSUB") == []


# --- the channel -------------------------------------------------------------------------------------

def test_a_channel_needs_a_read_token_and_a_refusal_is_a_security_alert(broker: Broker) -> None:
    with pytest.raises(InvalidStatus) as no_token:
        connect(broker.ws_url("WSSUB"), open_timeout=10)
    assert no_token.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as bad_token:
        connect(broker.ws_url("WSSUB", token="wrong-token"), open_timeout=10)
    assert bad_token.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as auditor:
        broker.channel("WSSUB", token=AUDITOR)
    assert auditor.value.response.status_code == 403
    with connect(broker.ws_url("WSSUB", token=READ), open_timeout=10) as ws:  # ?token= as the live stream
        nothing_more(ws, 0.2)
    with broker.channel("WSSUB", token=WRITE) as ws:
        nothing_more(ws, 0.2)
    alerts = table_of(AuditRecord)

    def alerted() -> list[Any]:
        with broker.engine.connect() as db:
            return list(db.execute(select(alerts).where(alerts.c.event_id == SECURITY_ALERT[0])))

    wait_until(lambda: len(alerted()) >= 3, 10, "three Security Alerts")
    users = sorted(r.user_id for r in alerted())
    assert users[:2] == ["anonymous", "anonymous"] and users[2].startswith("token audi")
    # a plain GET of the channel is not the channel
    assert broker.http.get("/dicomweb/subscribers/WSSUB", headers=AS_READER).status_code == 426


def test_channel_reports_match_the_dimse_subscriber_for_changes_over_dimse_and_ups_rs(
        broker: Broker, scu: Association) -> None:
    first, second = str(generate_uid()), str(generate_uid())
    assert create(scu, workitem("CT HEAD"), first) == 0
    assert int(action(scu, GLOBAL, SUBSCRIBE, ReceivingAE="WATCHER", DeletionLock="FALSE").Status) == 0
    with broker.channel("WSSUB") as ws:
        assert broker.subscribe(GLOBAL, "WSSUB").status_code == 201
        [initial] = receive(ws, 1)
        assert summary([initial]) == [(1, first, "SCHEDULED")]
        assert initial.AffectedSOPClassUID == "1.2.840.10008.5.1.4.34.6.4"  # UPS Event SOP Class
        assert initial.InputReadinessState == "READY"
        # over DIMSE: claim, progress, complete
        txn = str(generate_uid())
        assert change_state(scu, first, "IN PROGRESS", txn) == 0
        assert n_set(scu, first, progress(txn, 40)) == 0
        assert n_set(scu, first, final_attributes(txn)) == 0
        assert change_state(scu, first, "COMPLETED", txn) == 0
        # over UPS-RS: create, claim, cancel
        created = ups_rs(broker.http, "POST", f"/workitems?{second}", workitem("MR KNEE"))
        assert created.status_code == 201, created.text
        other_txn = str(generate_uid())
        claimed = broker.http.put(f"/dicomweb/workitems/{second}/state", content=state_body("IN PROGRESS", other_txn),
                                  headers={**AS_WRITER, "Content-Type": DICOM_JSON})
        assert claimed.status_code == 200, claimed.text
        canceled = broker.http.put(f"/dicomweb/workitems/{second}/state", content=state_body("CANCELED", other_txn),
                                   headers={**AS_WRITER, "Content-Type": DICOM_JSON})
        assert canceled.status_code == 200, canceled.text
        uids = {first, second}
        wait_until(lambda: (1, second, "CANCELED") in dimse_summary(broker.watcher, uids), 20, "the last report")
        time.sleep(0.3)
        seen_over_dimse = dimse_summary(broker.watcher, uids)
        reports = receive(ws, len(seen_over_dimse) - 1)
        nothing_more(ws)
    assert summary([initial, *reports]) == seen_over_dimse
    assert [(t, s) for t, u, s in seen_over_dimse if u == first] == [
        (1, "SCHEDULED"), (1, "IN PROGRESS"), (3, ""), (1, "COMPLETED")]
    assert [(t, s) for t, u, s in seen_over_dimse if u == second] == [
        (1, "SCHEDULED"), (5, ""), (1, "IN PROGRESS"), (1, "CANCELED")]
    [progress_report] = [r for r in reports if int(r.EventTypeID) == 3]
    assert progress_report.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress == 40
    # delivered: done in the outbox; never published by the relay (no lease, no attempt)
    ws_rows = [r for r in rows(broker.engine, OutboxEvent) if r.kind == "ups.ws_event"]
    wait_until(lambda: all(r.status == "done" for r in rows(broker.engine, OutboxEvent)
                           if r.kind == "ups.ws_event"), 10, "the channel's reports done")
    assert ws_rows and all(r.attempts == 0 for r in ws_rows)


def test_a_channel_opened_again_gets_what_it_missed_in_order_once(broker: Broker, scu: Association) -> None:
    uid = str(generate_uid())
    assert create(scu, workitem(), uid) == 0
    assert broker.subscribe(uid, "WSSUB").status_code == 201  # before any channel: the report waits
    txn = str(generate_uid())
    with broker.channel("WSSUB") as ws:
        assert summary(receive(ws, 1)) == [(1, uid, "SCHEDULED")]
        assert change_state(scu, uid, "IN PROGRESS", txn) == 0
        assert summary(receive(ws, 1)) == [(1, uid, "IN PROGRESS")]
    # closed: the changes go on, their reports wait
    for percent in (10, 20, 30):
        assert n_set(scu, uid, progress(txn, percent)) == 0
    assert n_set(scu, uid, final_attributes(txn)) == 0
    assert change_state(scu, uid, "COMPLETED", txn) == 0
    time.sleep(0.5)
    assert [r.status for r in rows(broker.engine, OutboxEvent) if r.kind == "ups.ws_event"][-4:] == ["pending"] * 4
    with broker.channel("WSSUB") as ws:
        missed = receive(ws, 4)
        assert summary(missed) == [(3, uid, ""), (3, uid, ""), (3, uid, ""), (1, uid, "COMPLETED")]
        assert [int(r.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress) for r in missed[:3]] \
            == [10, 20, 30]
        nothing_more(ws)
    with broker.channel("WSSUB") as ws:  # once: nothing comes again
        nothing_more(ws)


def test_a_second_channel_for_the_same_ae_takes_over(broker: Broker, scu: Association) -> None:
    uid = str(generate_uid())
    assert create(scu, workitem(), uid) == 0
    with broker.channel("WSSUB") as first:
        assert broker.subscribe(uid, "WSSUB").status_code == 201
        assert summary(receive(first, 1)) == [(1, uid, "SCHEDULED")]
        with broker.channel("WSSUB") as second:
            with pytest.raises(ConnectionClosed) as closed:
                first.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == TAKEN_OVER
            assert change_state(scu, uid, "IN PROGRESS", str(generate_uid())) == 0
            assert summary(receive(second, 1)) == [(1, uid, "IN PROGRESS")]
            nothing_more(second)


def test_a_filtered_global_subscription_reports_the_matching_workitems_only(broker: Broker,
                                                                             scu: Association) -> None:
    with broker.channel("WSSUB") as ws:
        assert broker.subscribe(FILTERED_GLOBAL, "WSSUB", "?ProcedureStepLabel=MR*").status_code == 201
        ct, mr = str(generate_uid()), str(generate_uid())
        assert create(scu, workitem("CT HEAD"), ct) == 0
        assert create(scu, workitem("MR KNEE"), mr) == 0
        reports = summary(receive(ws, 2))
        nothing_more(ws)
    assert reports == [(1, mr, "SCHEDULED"), (5, mr, "")]  # and Assigned: it names its station


# --- a cluster: two nodes' HTTP servers on one database ------------------------------------------------

def test_one_channel_per_ae_across_two_nodes_and_a_clean_close_at_shutdown(broker: Broker, scu: Association,
                                                                           database_url: str) -> None:
    uid = str(generate_uid())
    assert create(scu, workitem(), uid) == 0
    node_b = WebServerThread(broker_settings(database_url, "", node_id="node-b"))
    try:
        with broker.channel("WSSUB") as on_a:
            assert broker.subscribe(uid, "WSSUB").status_code == 201
            assert summary(receive(on_a, 1)) == [(1, uid, "SCHEDULED")]
            assert holder_of(broker.engine, lease_name("WSSUB")) != "node-b/dicomweb"
            with broker.channel("WSSUB", port=node_b.server.port) as on_b:
                with pytest.raises(ConnectionClosed) as closed:  # node A let go when node B asked
                    on_a.recv(timeout=10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == TAKEN_OVER
                assert holder_of(broker.engine, lease_name("WSSUB")) == "node-b/dicomweb"
                txn = str(generate_uid())
                assert change_state(scu, uid, "IN PROGRESS", txn) == 0  # committed by node A's process
                assert summary(receive(on_b, 1)) == [(1, uid, "IN PROGRESS")]
                # node B stops: its channel is closed (Service Restart), its lease let go
                stopping = threading.Thread(target=node_b.stop)
                stopping.start()
                with pytest.raises(ConnectionClosed) as shut:
                    on_b.recv(timeout=10)
                assert shut.value.rcvd is not None and shut.value.rcvd.code in (1001, 1012)
                stopping.join(30)
        assert holder_of(broker.engine, lease_name("WSSUB")) is None
        assert n_set(scu, uid, progress(txn, 50)) == 0
        with broker.channel("WSSUB") as again:  # back on node A at once: nothing lost, nothing twice
            assert summary(receive(again, 1)) == [(3, uid, "")]
            nothing_more(again)
    finally:
        if node_b.thread.is_alive() and not node_b.loop.is_closed():
            with contextlib.suppress(Exception):
                node_b.stop()


def test_a_dimse_subscriber_that_subscribes_over_ups_rs_moves_to_its_channel(broker: Broker,
                                                                             scu: Association) -> None:
    uid = str(generate_uid())
    assert create(scu, workitem(), uid) == 0
    assert int(action(scu, uid, SUBSCRIBE, ReceivingAE="WATCHER", DeletionLock="FALSE").Status) == 0
    assert broker.watcher.wait_for(1, uid) == [(1, "SCHEDULED")]
    with broker.channel("WATCHER") as ws:
        assert broker.subscribe(GLOBAL, "WATCHER").status_code == 201  # now on the WebSocket channel
        assert {s.channel for s in rows(broker.engine, UpsSubscription, subscriber_ae="WATCHER")} == {"websocket"}
        assert summary(receive(ws, 1)) == [(1, uid, "SCHEDULED")]  # the global subscription's initial report
        assert change_state(scu, uid, "IN PROGRESS", str(generate_uid())) == 0
        assert summary(receive(ws, 1)) == [(1, uid, "IN PROGRESS")]
        nothing_more(ws)
    assert broker.watcher.events(uid) == [(1, "SCHEDULED")]  # nothing more over DIMSE


# --- the outbox side, without servers ------------------------------------------------------------------

def test_the_relay_publishes_dimse_reports_and_never_websocket_ones(engine: Engine) -> None:
    now = datetime.now()
    with engine.begin() as db:
        for ae, channel in (("DIMSESUB", "dimse"), ("WSSUB", "websocket")):
            db.execute(table_of(UpsSubscription).insert(), {
                "subscriber_ae": ae, "workitem_uid": GLOBAL, "is_global": True, "matching_keys": None,
                "deletion_lock": False, "suspended_at": None, "created_at": now, "channel": channel})
        ids = ups_notify.notify(db, ["DIMSESUB", "WSSUB"], "1.2.3", ups_notify.STATE_REPORT,
                                ups_notify.state_info("IN PROGRESS"), now)
    assert len(ids) == 2
    kinds = {r.payload["subscriber"]: r.kind for r in rows(engine, OutboxEvent)}
    assert kinds == {"DIMSESUB": "ups.event", "WSSUB": "ups.ws_event"}
    published: list[str] = []
    Relay(engine, published.extend).run_once()
    [dimse_row] = [r for r in rows(engine, OutboxEvent) if r.kind == "ups.event"]
    assert published == [dimse_row.event_id]
    [waiting] = consumer.pending(engine, [ups_notify.ordering_key("WSSUB")], "ups.ws_event")
    assert waiting.payload["info"] == ups_notify.state_info("IN PROGRESS")
    assert consumer.mark_done(engine, [waiting.id], now) == 1
    assert consumer.pending(engine, [ups_notify.ordering_key("WSSUB")], "ups.ws_event") == []
    # the AE moves back to DIMSE: its waiting reports move with it, in their order
    with engine.begin() as db:
        ups_notify.notify(db, ["WSSUB"], "1.2.3", ups_notify.STATE_REPORT, ups_notify.state_info("COMPLETED"), now)
        ups_notify.use_channel(db, "WSSUB", "dimse")
    moved = [r for r in rows(engine, OutboxEvent) if r.payload["subscriber"] == "WSSUB" and r.status == "pending"]
    assert [r.kind for r in moved] == ["ups.event"]
