"""UPS subscriptions and N-EVENT-REPORTs over real associations, on SQLite and PostgreSQL.

pynetdicom AEs are the subscribers (event receivers on free ports, named in ``BROKER_DICOM_PEERS``); the
broker runs its DICOM server and its event path (relay + in-process worker, no Redis), so every event
goes outbox -> worker -> association to the subscriber. Covered: the initial State Report, event types
1 (state), 2 (cancel requested), 3 (progress), 4 (SCP status change), 5 (assigned), per-workitem,
global and filtered global subscriptions, suspend, order per subscriber, and a subscriber that is down
not holding back the others. ``broker run``'s RESTARTED / GOING DOWN reports: test_ups_runtime.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepPush,
)
from sqlalchemy import Engine

from broker.domain.ups_identity import derived_ups_uid
from broker.events.wiring import EventPath
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from tests.conftest import sample
from tests.dicom_support import dicom_server, free_port, wait_until
from tests.events_support import mpps_create, outbox, schedule
from tests.integration.test_ups_scp import (
    FILTERED_GLOBAL,
    GLOBAL,
    REQUEST_CANCEL,
    SUBSCRIBE,
    SUSPEND,
    action,
    change_state,
    create,
    final_attributes,
    n_set,
    progress,
    ups_scu,
    ups_settings,
    workitem,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@dataclass
class Received:
    event_type: int
    uid: str
    info: Dataset
    at: float


@dataclass
class Subscriber:
    """A pynetdicom AE receiving UPS N-EVENT-REPORTs (it accepts the UPS Event SOP Class)."""

    ae_title: str
    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)
    server: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Subscriber:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(UnifiedProcedureStepEvent)
        ae.add_supported_context(UnifiedProcedureStepPush)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])
        return self

    def _on_report(self, event: Any) -> tuple[int, None]:
        with self.lock:
            self.received.append(Received(int(event.event_type), str(event.request.AffectedSOPInstanceUID),
                                          event.event_information, time.monotonic()))
        return 0x0000, None

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def peer(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def events(self, uid: str | None = None) -> list[tuple[int, str]]:
        """(event type, Procedure Step State or '') of what arrived, in order."""
        with self.lock:
            return [(r.event_type, str(r.info.get("ProcedureStepState", ""))) for r in self.received
                    if uid is None or r.uid == uid]

    def wait_for(self, count: int, uid: str | None = None, seconds: float = 20) -> list[tuple[int, str]]:
        wait_until(lambda: len(self.events(uid)) >= count, seconds, f"{count} events at {self.ae_title}")
        return self.events(uid)


@pytest.fixture
def subscribers() -> Iterator[dict[str, Subscriber]]:
    started = {name: Subscriber(name).start() for name in ("WATCHER", "GLOBALW", "FILTERW")}
    yield started
    for subscriber in started.values():
        subscriber.stop()


@pytest.fixture
def running(engine: Engine, database_url: str, subscribers: dict[str, Subscriber]) -> Iterator[tuple[int, EventPath]]:
    """The DICOM server and the event path; DOWN is a peer nobody listens for."""
    peers = ",".join([s.peer() for s in subscribers.values()] + [f"DOWN@127.0.0.1:{free_port()}"])
    settings = ups_settings(database_url, peers, event_backoff_base=0.5, event_backoff_max=2,
                            event_poll_interval=0.1)
    path = EventPath.start(settings, engine)
    try:
        with dicom_server(settings, database_url, path.workflow) as server:
            yield server.port, path
    finally:
        path.stop()


def test_subscribers_get_the_events_of_a_workitem_in_order(engine: Engine, running: tuple[int, EventPath],
                                                            subscribers: dict[str, Subscriber]) -> None:
    port, _ = running
    watcher, global_, filtered = subscribers["WATCHER"], subscribers["GLOBALW"], subscribers["FILTERW"]
    scu = ups_scu(port, "PERFORMER")
    try:
        uid, other, txn = str(generate_uid()), str(generate_uid()), str(generate_uid())
        assert create(scu, workitem("CT HEAD"), uid) == 0x0000
        assert int(action(scu, GLOBAL, SUBSCRIBE, ReceivingAE="GLOBALW", DeletionLock="FALSE").Status) == 0
        assert int(action(scu, GLOBAL, SUBSCRIBE, ReceivingAE="DOWN", DeletionLock="FALSE").Status) == 0
        assert int(action(scu, FILTERED_GLOBAL, SUBSCRIBE, ReceivingAE="FILTERW", DeletionLock="FALSE",
                          ProcedureStepLabel="MR*").Status) == 0
        assert int(action(scu, uid, SUBSCRIBE, ReceivingAE="WATCHER", DeletionLock="TRUE").Status) == 0
        assert watcher.wait_for(1) == [(1, "SCHEDULED")]  # the initial State Report
        assert global_.wait_for(1) == [(1, "SCHEDULED")]  # the global subscription's, for the existing one
        assert change_state(scu, uid, "IN PROGRESS", txn) == 0
        assert n_set(scu, uid, progress(txn, 40)) == 0
        station = Dataset()
        station.CodeValue, station.CodingSchemeDesignator, station.CodeMeaning = "CT02", "99LOCAL", "CT 2"
        reassigned = Dataset()
        reassigned.TransactionUID = txn
        reassigned.ScheduledStationNameCodeSequence = [station]
        assert n_set(scu, uid, reassigned) == 0
        assert n_set(scu, uid, final_attributes(txn)) == 0
        assert change_state(scu, uid, "COMPLETED", txn) == 0
        expected = [(1, "SCHEDULED"), (1, "IN PROGRESS"), (3, ""), (5, ""), (1, "COMPLETED")]
        assert watcher.wait_for(5) == expected
        assert global_.wait_for(5, uid) == expected
        [progress_report] = [r for r in watcher.received if r.event_type == 3]
        assert progress_report.info.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress == 40
        [assigned] = [r for r in watcher.received if r.event_type == 5]
        assert assigned.info.ScheduledStationNameCodeSequence[0].CodeValue == "CT02"
        # A new workitem: global subscribers hear of it (State Report, and Assigned for its station);
        # the filter keeps FILTERW to MR items.
        assert create(scu, workitem("MR KNEE"), other) == 0x0000
        assert global_.wait_for(2, other) == [(1, "SCHEDULED"), (5, "")]
        assert filtered.wait_for(2, other) == [(1, "SCHEDULED"), (5, "")]
        assert filtered.events(uid) == []
        # Request Cancel of an IN PROGRESS workitem: event type 2 (the performer decides).
        other_txn = str(generate_uid())
        assert change_state(scu, other, "IN PROGRESS", other_txn) == 0
        assert int(action(scu, other, REQUEST_CANCEL, ReasonForCancellation="wrong patient").Status) == 0
        assert change_state(scu, other, "CANCELED", other_txn) == 0
        assert filtered.wait_for(5, other) == [(1, "SCHEDULED"), (5, ""), (1, "IN PROGRESS"), (2, ""),
                                               (1, "CANCELED")]
        [cancel_requested] = [r for r in filtered.received if r.event_type == 2]
        assert cancel_requested.info.RequestingAE == "PERFORMER"
        assert cancel_requested.info.ReasonForCancellation == "wrong patient"
        assert watcher.events(other) == []  # subscribed to the first workitem only
    finally:
        scu.release()
    # DOWN never answered: its events wait (retried with backoff) and held back nobody else.
    down = [e for e in outbox(engine, "ups.event") if e.payload["subscriber"] == "DOWN"]
    assert down and all(e.status != "done" for e in down)
    assert any(e.attempts >= 1 and "DOWN" in e.last_error for e in down)
    # A subscriber has the report before the worker commits its event as done (one commit per task).
    wait_until(lambda: all(e.status == "done" for e in outbox(engine, "ups.event")
                           if e.payload["subscriber"] != "DOWN"), 10, "every other subscriber's events done")


def test_hl7_and_mpps_changes_reach_the_subscribers(engine: Engine, mappings: MappingSet,
                                                    running: tuple[int, EventPath],
                                                    subscribers: dict[str, Subscriber]) -> None:
    port, _ = running
    order = schedule(engine, mappings)
    uid = derived_ups_uid(order.study_instance_uid, order.sps_id)
    scu = ups_scu(port, "MONITOR")
    try:
        assert int(action(scu, uid, SUBSCRIBE, ReceivingAE="WATCHER", DeletionLock="FALSE").Status) == 0
        assert subscribers["WATCHER"].wait_for(1) == [(1, "SCHEDULED")]
        mpps_uid = str(generate_uid())
        status, _ = scu.send_n_create(mpps_create(order.study_instance_uid, order.sps_id),
                                      ModalityPerformedProcedureStep, mpps_uid)
        assert status.Status == 0x0000
        assert subscribers["WATCHER"].wait_for(2) == [(1, "SCHEDULED"), (1, "IN PROGRESS")]
    finally:
        scu.release()


def test_global_subscribers_hear_of_a_step_the_hl7_intake_scheduled(engine: Engine, mappings: MappingSet,
                                                                     running: tuple[int, EventPath],
                                                                     subscribers: dict[str, Subscriber]) -> None:
    """A step created by an HL7 order is a new workitem: a State Report SCHEDULED to each global
    subscriber whose filter it matches (the sample is a CT order), as for one made by N-CREATE."""
    port, _ = running
    global_, filtered, watcher = subscribers["GLOBALW"], subscribers["FILTERW"], subscribers["WATCHER"]
    scu = ups_scu(port, "MONITOR")
    try:
        assert int(action(scu, GLOBAL, SUBSCRIBE, ReceivingAE="GLOBALW", DeletionLock="FALSE").Status) == 0
        assert int(action(scu, FILTERED_GLOBAL, SUBSCRIBE, ReceivingAE="FILTERW", DeletionLock="FALSE",
                          ProcedureStepLabel="CT*").Status) == 0
        assert int(action(scu, FILTERED_GLOBAL, SUBSCRIBE, ReceivingAE="WATCHER", DeletionLock="FALSE",
                          ProcedureStepLabel="MR*").Status) == 0
        first = schedule(engine, mappings)
        uid = derived_ups_uid(first.study_instance_uid, first.sps_id)
        assert global_.wait_for(1, uid) == [(1, "SCHEDULED")]
        assert filtered.wait_for(1, uid) == [(1, "SCHEDULED")]
        [report] = [r for r in global_.received if r.uid == uid]
        assert (report.info.ProcedureStepState, report.info.InputReadinessState) == ("SCHEDULED", "READY")
        # An order of two steps (OMI^O23, one step per IPC): each is announced.
        replies = Intake(engine, mappings).handle(sample("omi_o23_two_steps.hl7"))
        assert replies and all(b"MSA|CA" in reply for reply in replies), replies
        two = [derived_ups_uid("1.2.826.0.1.3680043.10.543.501", sps_id) for sps_id in ("SPS501A", "SPS501B")]
        for step_uid in two:
            assert global_.wait_for(1, step_uid) == [(1, "SCHEDULED")]
        # Suspended: the next order's step is not announced to GLOBALW (FILTERW still hears of it).
        assert int(action(scu, GLOBAL, SUSPEND, ReceivingAE="GLOBALW").Status) == 0
        second = schedule(engine, mappings, number=2)
        later = derived_ups_uid(second.study_instance_uid, second.sps_id)
        assert filtered.wait_for(1, later) == [(1, "SCHEDULED")]
    finally:
        scu.release()
    # Each report once; none for the subscriber whose filter the steps do not match, none after suspension.
    wait_until(lambda: all(e.status == "done" for e in outbox(engine, "ups.event")), 10, "every event done")
    assert global_.events(uid) == [(1, "SCHEDULED")] and global_.events(later) == []
    assert [global_.events(step_uid) for step_uid in two] == [[(1, "SCHEDULED")]] * 2
    assert filtered.events(uid) == filtered.events(later) == [(1, "SCHEDULED")]
    assert all(filtered.events(step_uid) == [] for step_uid in two)  # MR steps, labelled T1 SAG / T2 COR
    assert watcher.events() == []


def test_suspended_global_subscription_takes_no_new_workitems(running: tuple[int, EventPath],
                                                              subscribers: dict[str, Subscriber]) -> None:
    port, path = running
    global_ = subscribers["GLOBALW"]
    scu = ups_scu(port, "PERFORMER")
    try:
        before, after = str(generate_uid()), str(generate_uid())
        assert create(scu, workitem(), before) == 0
        assert int(action(scu, GLOBAL, SUBSCRIBE, ReceivingAE="GLOBALW", DeletionLock="FALSE").Status) == 0
        global_.wait_for(1, before)
        assert int(action(scu, GLOBAL, SUSPEND, ReceivingAE="GLOBALW").Status) == 0
        assert create(scu, workitem(), after) == 0
        assert change_state(scu, before, "IN PROGRESS", str(generate_uid())) == 0
        assert global_.wait_for(2, before) == [(1, "SCHEDULED"), (1, "IN PROGRESS")]
        assert global_.events(after) == []  # created after the suspension
        # SCP Status Change (type 4) to every subscriber, on the well-known global instance.
        assert len(path.workflow.ups.scp_status_change("RESTARTED")) == 1
        wait_until(lambda: any(r.event_type == 4 for r in global_.received), what="SCP status change")
        [change] = [r for r in global_.received if r.event_type == 4]
        assert change.uid == GLOBAL
        assert (change.info.SCPStatus, change.info.SubscriptionListStatus) == ("RESTARTED", "WARM START")
    finally:
        scu.release()


def test_a_subscribers_events_share_one_association_until_it_goes_away(engine: Engine) -> None:
    """The worker keeps the association to a subscriber open between its events (one association per
    event was most of the delivery cost at a steady rate); when the subscriber has closed it (restarted
    here), the next event goes out on a new association, not lost."""
    from broker.config import Peer
    from broker.dicom_json import element, tag_of
    from broker.outbound.ups_events import AssociationPool, deliver
    from broker.outbox.runner import Event

    subscriber = Subscriber("KEEPER").start()
    accepted: list[int] = []
    subscriber.server.bind(evt.EVT_ACCEPTED, lambda event: accepted.append(1))
    peer, pool, uid = Peer("KEEPER", "127.0.0.1", subscriber.port), AssociationPool(), str(generate_uid())

    def report(n: int, state: str) -> Event:
        info = {tag_of("ProcedureStepState"): element("ProcedureStepState", state),
                tag_of("InputReadinessState"): element("InputReadinessState", "READY")}
        return Event(n, f"event-{n}", "ups.event", {"subscriber": "KEEPER", "uid": uid, "event_type": 1,
                                                      "info": info}, "ups-subscriber:KEEPER", 0)

    try:
        for n, state in enumerate(("SCHEDULED", "IN PROGRESS", "COMPLETED"), start=1):
            assert deliver("BROKER", peer, report(n, state), engine, timeout=10, pool=pool) == 1
        assert subscriber.wait_for(3) == [(1, "SCHEDULED"), (1, "IN PROGRESS"), (1, "COMPLETED")]
        assert len(accepted) == 1
    finally:
        for association in subscriber.server.active_associations:  # the subscriber process ends
            association.abort()
        subscriber.stop()
    restarted = Subscriber("KEEPER", port=subscriber.port).start()
    try:
        assert deliver("BROKER", peer, report(4, "CANCELED"), engine, timeout=10, pool=pool) == 1
        assert restarted.wait_for(1) == [(1, "CANCELED")]
    finally:
        restarted.stop()
