"""Who hears of a UPS change, and the outbox rows that tell them (PS3.4 CC.2.4, N-EVENT-REPORT).

One outbox row per subscriber and event, in the transaction of the change, with the ordering key
``ups-subscriber:<AE>``: a subscriber's events arrive in the order of the changes, and a subscriber
that is down holds back only its own key. :func:`step_status_changed` is the one hook every step
status change goes through (HL7, MPPS, UPS alike); with no subscription it costs one indexed query,
and none at all when the UPS state does not change (SCHEDULED -> ARRIVED). :func:`step_scheduled` is
the hook of a step the HL7 intake creates (UPS N-CREATE announces its own workitems).

A subscriber's channel (``ups_subscriptions.channel``) decides the kind of its rows: ``ups.event`` for
DIMSE (the relay publishes them to the workers, :mod:`broker.outbound.ups_events` sends them),
``ups.ws_event`` for a UPS-RS subscriber, whose WebSocket channel takes them from the outbox
(:mod:`broker.web.dicomweb.channel`). Same payload and key either way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, bindparam, func, select, update

from broker.dicom_json import JsonDataset, element, tag_of
from broker.domain import ups_matching as matching
from broker.domain import ups_view as view
from broker.domain.ups_states import UpsState, ups_state
from broker.outbox import outbox
from broker.store.tables import UpsSubscription, UpsWorkitem, table_of

SUBSCRIPTIONS = table_of(UpsSubscription)
WORKITEMS = table_of(UpsWorkitem)

# Event Type ID (PS3.4 Table CC.2.4-1).
STATE_REPORT, CANCEL_REQUESTED, PROGRESS_REPORT, SCP_STATUS_CHANGE, ASSIGNED = 1, 2, 3, 4, 5

_CANDIDATES = select(SUBSCRIPTIONS).where(SUBSCRIPTIONS.c.workitem_uid.in_(
    [bindparam("uid"), view.GLOBAL_SUBSCRIPTION, view.FILTERED_GLOBAL_SUBSCRIPTION])).order_by(SUBSCRIPTIONS.c.id)
_ATTRIBUTES = select(WORKITEMS.c.attributes).where(WORKITEMS.c.step_fk == bindparam("pk"))
# The subscription channels (ups_subscriptions.channel).
DIMSE, WEBSOCKET = "dimse", "websocket"
_WEBSOCKET_AES = (select(SUBSCRIPTIONS.c.subscriber_ae).distinct()
                  .where(SUBSCRIPTIONS.c.subscriber_ae.in_(bindparam("aes", expanding=True)),
                         SUBSCRIPTIONS.c.channel == WEBSOCKET))


def global_subscription_id() -> Any:
    """A scalar subquery: the key of some global or filtered global subscription, NULL when there is
    none. For folding into a statement the caller runs anyway (a new order's lookup), so that a new step
    costs no query of its own while nobody subscribes globally. Two equality lookups on the workitem
    index, not an IN: a prepared statement's generic plan of either uses the index."""
    def first(uid: str) -> Any:
        return select(SUBSCRIPTIONS.c.id).where(SUBSCRIPTIONS.c.workitem_uid == uid).limit(1).scalar_subquery()
    return func.coalesce(first(view.GLOBAL_SUBSCRIPTION), first(view.FILTERED_GLOBAL_SUBSCRIPTION))


def ordering_key(subscriber_ae: str) -> str:
    return f"ups-subscriber:{subscriber_ae}"


def websocket_subscribers(db: Connection, aes: Iterable[str]) -> set[str]:
    """Those of ``aes`` whose subscriptions are on the WebSocket channel (one indexed query; none for no
    AE)."""
    wanted = sorted(set(aes))
    if not wanted:
        return set()
    return set(db.execute(_WEBSOCKET_AES, {"aes": wanted}).scalars())


def event_kind(websocket: bool) -> str:
    """The outbox kind of a report: the relay delivers ``ups.event`` over DIMSE; ``ups.ws_event`` waits
    for the subscriber's WebSocket channel (:mod:`broker.outbox.consumer`). Same payload, same ordering
    key: a subscriber's reports keep the order of the changes either way."""
    return outbox.UPS_WS_EVENT if websocket else outbox.UPS_EVENT


def use_channel(db: Connection, subscriber_ae: str, channel: str) -> None:
    """The AE's latest subscription decides its channel for all of its subscriptions (one channel per
    subscriber, so one ordered stream of reports). Its reports still waiting for the other channel
    move over with it, in their order; a report a DIMSE worker is sending right now stays where it is."""
    moved = db.execute(update(SUBSCRIPTIONS).where(SUBSCRIPTIONS.c.subscriber_ae == subscriber_ae,
                                                   SUBSCRIPTIONS.c.channel != channel)
                       .values(channel=channel)).rowcount
    if moved:
        old, new = event_kind(channel != WEBSOCKET), event_kind(channel == WEBSOCKET)
        db.execute(update(outbox.OUTBOX).where(outbox.OUTBOX.c.ordering_key == ordering_key(subscriber_ae),
                                               outbox.OUTBOX.c.kind == old, outbox.OUTBOX.c.status == "pending")
                   .values(kind=new, lease_until=None))


def enqueue(db: Connection, subscriber_ae: str, uid: str, event_type: int, info: JsonDataset, now: datetime) -> str:
    """One N-EVENT-REPORT for ``subscriber_ae`` into the caller's transaction; returns its event id.
    ``queued_at`` (epoch seconds) lets a receiver measure change-to-delivery latency."""
    kind = event_kind(bool(websocket_subscribers(db, [subscriber_ae])))
    return outbox.add_event(db, kind, {"subscriber": subscriber_ae, "uid": uid, "event_type": event_type,
                                       "info": info, "queued_at": time.time()},
                            ordering_key(subscriber_ae), now)


def covers(subscription: Row[Any], uid: str, created_at: datetime | None, ups: JsonDataset | None) -> bool:
    """Whether a subscription row covers the workitem ``uid`` (``ups``: its attributes, needed only
    for a filtered global subscription)."""
    if subscription.workitem_uid == uid:
        return True
    if subscription.suspended_at is not None and created_at is not None and created_at > subscription.suspended_at:
        return False
    if subscription.workitem_uid == view.FILTERED_GLOBAL_SUBSCRIPTION and subscription.matching_keys:
        return ups is not None and matching.dataset_matches(subscription.matching_keys, ups)
    return bool(subscription.is_global)


def subscribers_of(db: Connection, uid: str, created_at: datetime | None, ups_of: Any) -> list[str]:
    """The AE titles subscribed to the workitem, once each; ``ups_of()`` gives its attributes (called
    only when a filtered global subscription must be checked)."""
    rows = db.execute(_CANDIDATES, {"uid": uid}).all()
    if not rows:
        return []
    ups = ups_of() if any(r.matching_keys for r in rows) else None
    return list(dict.fromkeys(r.subscriber_ae for r in rows if covers(r, uid, created_at, ups)))


def state_info(state: UpsState | str, extra: JsonDataset | None = None) -> JsonDataset:
    """Event information of a UPS State Report."""
    info = {tag_of("ProcedureStepState"): element("ProcedureStepState", str(state)),
            tag_of("InputReadinessState"): element("InputReadinessState", "READY")}
    if extra:
        info.update(extra)
    return dict(sorted(info.items()))


def notify(db: Connection, targets: Iterable[str], uid: str, event_type: int, info: JsonDataset,
           now: datetime) -> list[str]:
    """The same event to each of ``targets`` (one INSERT per channel kind); returns the event ids."""
    queued_at = time.time()
    aes = list(targets)
    websocket = websocket_subscribers(db, aes)
    ids: list[str] = []
    for kind in (outbox.UPS_EVENT, outbox.UPS_WS_EVENT):
        ids += outbox.add_events(db, kind, [
            ({"subscriber": ae, "uid": uid, "event_type": event_type, "info": info, "queued_at": queued_at},
             ordering_key(ae)) for ae in aes if event_kind(ae in websocket) == kind], now)
    return ids


def step_status_changed(db: Connection, step: Row[Any], new_status: str, now: datetime) -> None:
    """The hook of :meth:`WorklistService._set_status`: a step status change that changes the UPS
    state is a State Report to the workitem's subscribers."""
    old_state, new_state = ups_state(step.sps_status), ups_state(str(new_status))
    uid = step.ups_instance_uid
    if old_state == new_state or not uid:
        return

    def ups_of() -> JsonDataset:
        attributes = db.execute(_ATTRIBUTES, {"pk": step.id}).scalar_one_or_none()
        return view.workitem(uid, step.item, str(new_status), attributes)

    targets = subscribers_of(db, uid, step.created_at, ups_of)
    if targets:
        extra: JsonDataset = {}
        if new_state == UpsState.CANCELED:
            extra[tag_of("ReasonForCancellation")] = element("ReasonForCancellation", f"step {new_status}")
        notify(db, targets, uid, STATE_REPORT, state_info(new_state, extra), now)


def step_scheduled(db: Connection, uid: str, item: JsonDataset, now: datetime) -> None:
    """A step the HL7 intake created is a new UPS workitem: its global subscribers (those whose filter it
    matches, and not suspended before ``now``) get a State Report SCHEDULED, as for a workitem made by
    N-CREATE (PS3.4 CC.2.4). Per-workitem subscriptions cannot exist yet."""
    targets = subscribers_of(db, uid, now, lambda: view.workitem(uid, item, str(UpsState.SCHEDULED), None))
    if targets:
        notify(db, targets, uid, STATE_REPORT, state_info(UpsState.SCHEDULED), now)


def scp_status_info(scp_status: str) -> JsonDataset:
    """Event information of an SCP Status Change (type 4): the broker keeps its subscription list and
    workitems across restarts (WARM START)."""
    return {tag_of("SCPStatus"): element("SCPStatus", scp_status),
            tag_of("SubscriptionListStatus"): element("SubscriptionListStatus", "WARM START"),
            tag_of("UnifiedProcedureStepListStatus"): element("UnifiedProcedureStepListStatus", "WARM START")}


def all_subscribers(db: Connection) -> list[str]:
    return list(db.execute(select(SUBSCRIPTIONS.c.subscriber_ae).distinct()
                           .order_by(SUBSCRIPTIONS.c.subscriber_ae)).scalars())

