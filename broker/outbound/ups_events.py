"""UPS N-EVENT-REPORTs to subscribers (PS3.4 CC.2.4): the batch handler of the ``ups.event`` outbox kind.

The subscriber's address is its entry in ``BROKER_DICOM_PEERS``. The runner hands over the events a
task claimed (the heads of their subscribers' keys, ``ups-subscriber:<AE>``); they go out side by side,
each on its subscriber's association, and then, in order, each subscriber's other events that are due
(for up to :data:`DRAIN_SECONDS`): while a claimed event runs, the later events of its key are blocked
for every other worker, so taking them here keeps the order and spares a task per event. A subscriber
that is down fails fast (connection refused) and only its own key waits for the retry with backoff;
the others' events go on.

A subscriber in ``dicom_tls_peers`` is reached over TLS (:class:`~broker.outbound.dicom_peers.PeerTls`),
its certificate verified; one whose certificate is not accepted fails like one that is down.

One association to a subscriber at a time, for the whole cluster: every process that delivers (the
in-process worker of each ``broker run`` node, each Celery worker process) keeps its associations open
between events, so each holds the lease ``ups-association:<AE>`` while its association is open, and a
process that must open one while another holds it asks that one to let go and waits up to
:data:`HANDOFF_WAIT` seconds (:mod:`broker.cluster.handoff`); the holder's pool closes its idle
association within :data:`~broker.cluster.handoff.POLL` seconds of the request. A holder that died
loses the lease after :data:`ASSOCIATION_LEASE_SECONDS`, within the wait. A delivery that cannot get
the lease in time fails like a subscriber that is down, and is retried. A process that ends cleanly
releases its associations and their leases (at exit).
"""

from __future__ import annotations

import atexit
import itertools
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any
from uuid import uuid4

import structlog
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from sqlalchemy import Engine, bindparam, delete, select
from sqlalchemy.exc import SQLAlchemyError

from broker.cluster.handoff import POLL, HandOffLeases
from broker.cluster.nodes import node_id_for
from broker.config import Peer, Settings
from broker.dicom import dimse, pdu
from broker.outbound.dicom_peers import PeerFailure, PeerTls
from broker.outbox.outbox import OUTBOX
from broker.outbox.runner import Event
from broker.store.session import make_engine
from broker.tls import handshake_failure

log = structlog.get_logger(__name__)

UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"
DRAIN_BATCH = 200  # followers read (and marked done) at a time
DRAIN_SECONDS = 5.0  # longest one batch keeps draining its subscribers' backlogs
FORGET_EVERY = 8  # runs between two deletions of done heads (a transaction each time)
# An association to a subscriber is kept open this long after its last event, for the next one: opening
# one per event (TCP, A-ASSOCIATE, A-RELEASE) was most of the worker's CPU per event at a steady rate.
IDLE_SECONDS = 20.0
# How long a process waits for another process of the cluster to let go of its association to a
# subscriber: a live holder answers within a poll (~0.1 s); a dead one's lease expires first, within
# ASSOCIATION_LEASE_SECONDS, which the holder's watcher renews every third of it (a write a second and
# a half per process that keeps associations). Longer than the lease, so a dead holder costs a wait,
# not a failed delivery.
ASSOCIATION_LEASE_SECONDS = 4.0
HANDOFF_WAIT = 6.0
_runs = itertools.count(1)
MAXIMUM_LENGTH = 65536
# As the broker's acceptor names itself (broker.dicom.server), without importing the server here.
IMPLEMENTATION_CLASS_UID = str(generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["worklist-broker"]))
IMPLEMENTATION_VERSION_NAME = "WLBROKER_UPS"


def association_lease(ae_title: str) -> str:
    """The lease a process holds while it keeps an association to the subscriber ``ae_title`` open."""
    return f"ups-association:{ae_title}"


class AssociationPool:
    """The open associations of this process, one per subscriber, between its events.

    Events of one subscriber run one at a time (their ordering key), so an association is used by one
    thread at a time: :meth:`take` removes it from the pool, :meth:`give` puts it back after a
    delivery that went well. One idle longer than :data:`IDLE_SECONDS` is released, not reused.

    With ``leases`` (a cluster: see the module's doc) :meth:`open` takes the subscriber's association
    lease before it connects, and closing the association lets the lease go. A watcher thread, running
    while the pool holds something, closes the idle associations another process asks for (and those
    idle too long, releasing their leases); one in use when asked for is closed when it is given back.
    """

    def __init__(self, idle_seconds: float = IDLE_SECONDS, leases: HandOffLeases | None = None,
                 handoff_wait: float = HANDOFF_WAIT) -> None:
        self.idle_seconds = idle_seconds
        self.leases = leases
        self.handoff_wait = handoff_wait
        self._lock = threading.Lock()
        self._open: dict[str, tuple[EventAssociation, float]] = {}
        self._to_close: set[str] = set()  # asked for while in use: closed when given back
        self._watcher: threading.Thread | None = None

    def reserve(self, peers: list[Peer]) -> tuple[list[str], set[str]]:
        """Before a batch: take the association leases of its subscribers side by side (one hand-over
        wait for the batch). Returns the leases taken (each one use, ended by :meth:`unreserve`) and the
        AE titles refused (another process did not let go in time)."""
        if self.leases is None or not peers:
            return [], set()
        names = {association_lease(peer.ae_title): peer.ae_title for peer in peers}
        try:
            got = self.leases.acquire_many(list(names), self.handoff_wait)
        except SQLAlchemyError as exc:
            log.warning("ups.association_lease_failed", error=type(exc).__name__)
            return [], set(names.values())
        if got:
            self._watch()
        return sorted(got), {ae for name, ae in names.items() if name not in got}

    def unreserve(self, names: list[str]) -> None:
        """End the uses :meth:`reserve` took; the open associations keep their own."""
        if self.leases is not None:
            for name in names:
                self.leases.release(name)

    def open(self, calling_ae: str, peer: Peer, timeout: float, tls: ssl.SSLContext | None) -> EventAssociation:
        """A new association to ``peer`` (raises OSError or :class:`PeerFailure`); in a cluster once this
        process holds the subscriber's association lease."""
        association = EventAssociation(calling_ae, peer, timeout, tls)
        if self.leases is not None:
            name = association_lease(peer.ae_title)
            try:
                if not self.leases.acquire(name, self.handoff_wait):
                    raise PeerFailure(f"{peer.ae_title}: another process of the cluster keeps its association "
                                      f"open and did not let go within {self.handoff_wait:g} s")
            except SQLAlchemyError as exc:
                raise PeerFailure(f"{peer.ae_title}: the association lease cannot be taken: "
                                  f"{type(exc).__name__}") from exc
            with self._lock:
                self._to_close.discard(peer.ae_title)
            association.on_close = partial(self.leases.release, name)
            self._watch()
        try:
            return association.open()
        except BaseException:
            association.close(release=False)  # lets the lease go
            raise

    def _watch(self) -> None:
        with self._lock:
            if self._watcher is not None and self._watcher.is_alive():
                return
            self._watcher = threading.Thread(target=self._watch_loop, name="ups-association-leases", daemon=True)
            self._watcher.start()

    def _watch_loop(self) -> None:
        """Until the pool holds nothing: answer requests to let go, close what is idle too long."""
        assert self.leases is not None
        while True:
            time.sleep(POLL)
            now = time.monotonic()
            with self._lock:
                expired = [ae for ae, (_, since) in self._open.items() if now - since > self.idle_seconds]
                closing = [self._open.pop(ae)[0] for ae in expired]
            try:
                wanted, lost = self.leases.check()
            except Exception as exc:  # the database is away: look again at the next poll
                log.warning("ups.association_lease_check_failed", error=type(exc).__name__)
                wanted, lost = set(), set()
            for name in wanted | lost:
                ae = name.split(":", 1)[1]
                with self._lock:
                    found = self._open.pop(ae, None)
                    if found is None:
                        self._to_close.add(ae)
                if found is not None:
                    closing.append(found[0])
                    log.info("ups.association_handed_over", subscriber=ae, lost=name in lost)
            for association in closing:
                association.close(release=True)
            with self._lock:
                if not self._open and not self.leases.held():
                    self._watcher = None
                    return

    def take(self, peer: Peer) -> EventAssociation | None:
        with self._lock:
            found = self._open.pop(peer.ae_title, None)
        if found is None:
            return None
        association, since = found
        if time.monotonic() - since > self.idle_seconds or association.peer != peer:
            association.close(release=True)
            return None
        return association

    def give(self, peer: Peer, association: EventAssociation) -> None:
        with self._lock:
            if peer.ae_title in self._to_close:  # another process waits for it
                self._to_close.discard(peer.ae_title)
                previous, association_kept = None, False
            else:
                previous = self._open.pop(peer.ae_title, None)
                self._open[peer.ae_title] = (association, time.monotonic())
                association_kept = True
        if not association_kept:
            association.close(release=True)
        if previous is not None:
            previous[0].close(release=True)

    def close(self) -> None:
        """Release every idle association (and its lease); never raises (also run at exit)."""
        with self._lock:
            idle, self._open = [association for association, _ in self._open.values()], {}
        for association in idle:
            try:
                association.close(release=True)
            except Exception as exc:  # the database is gone: the lease expires by itself
                log.warning("ups.association_close_failed", error=type(exc).__name__)


class UnknownSubscriber(Exception):
    """The subscriber's AE title is not (or no longer) in ``BROKER_DICOM_PEERS``."""


# What a batch handler answers: the events (by ``Event.id``) that were not delivered, and why.
Failures = dict[int, Exception]


def build_ups_event_handler(settings: Settings, engine: Engine,
                            clock: Callable[[], datetime] = datetime.now) -> Callable[[list[Event]], Failures]:
    """The batch handler of the ``ups.event`` kind (see :meth:`EventRunner.run_many`)."""
    peers = settings.peers
    readers: list[Engine] = []  # made on first use: most processes never deliver a UPS event
    pools: list[AssociationPool] = []
    tls = PeerTls(settings)

    def ups_events(events: list[Event]) -> Failures:
        failures: Failures = {}
        batch: list[tuple[Peer, Event]] = []
        for event in events:
            subscriber = event.payload["subscriber"]
            peer = peers.get(subscriber)
            if peer is None:
                failures[event.id] = UnknownSubscriber(f"{subscriber} is not in BROKER_DICOM_PEERS")
            else:
                batch.append((peer, event))
        if not readers:
            readers.append(make_engine(settings.database_url, pool_size=4, for_reading=True))
            # this process's associations are one holder of the cluster's association leases
            holder = f"{node_id_for(settings)}:{os.getpid()}:{uuid4().hex[:8]}"
            lease = min(settings.cluster_lease_seconds, ASSOCIATION_LEASE_SECONDS)
            pools.append(AssociationPool(leases=HandOffLeases(engine, holder, lease, reader=readers[0])))
            # a process that ends cleanly releases its associations (A-RELEASE) and their leases at once
            atexit.register(pools[0].close)
        delivery = deliver_many(settings.ae_title, batch, engine, settings.dicom_dimse_timeout, clock,
                                drain_seconds=min(DRAIN_SECONDS, settings.event_lease_seconds / 4),
                                reader=readers[0], pool=pools[0], tls=tls)
        failures.update(delivery.failures)
        return failures

    return ups_events


_DUE_FOLLOWERS = (select(OUTBOX.c.id, OUTBOX.c.ordering_key, OUTBOX.c.payload).where(
    OUTBOX.c.ordering_key.in_(bindparam("keys", expanding=True)), OUTBOX.c.status == "pending",
    OUTBOX.c.next_attempt_at <= bindparam("now")).order_by(OUTBOX.c.id).limit(DRAIN_BATCH))
_FORGET_DELIVERED = delete(OUTBOX).where(OUTBOX.c.id.in_(bindparam("ids", expanding=True)),
                                         OUTBOX.c.status == "pending")
# A key's done rows are all earlier than its head (the event being delivered, not done yet), so one
# bound, the batch's last head, serves every key of the batch.
_FORGET_EARLIER_DONE = delete(OUTBOX).where(OUTBOX.c.ordering_key.in_(bindparam("keys", expanding=True)),
                                            OUTBOX.c.id < bindparam("before"), OUTBOX.c.status == "done",
                                            OUTBOX.c.kind == bindparam("kind"))


@dataclass
class Delivery:
    """What :func:`deliver_many` did: the heads not delivered, and how many followers went out."""

    failures: Failures = field(default_factory=dict)
    followers: int = 0


class _Exchange:
    """One N-EVENT-REPORT on its way: sent, its response not read yet."""

    def __init__(self, payload: dict[str, Any], association: EventAssociation, reused: bool) -> None:
        self.payload, self.association, self.reused = payload, association, reused


def _open_and_request(calling_ae: str, peer: Peer, payload: dict[str, Any], timeout: float,
                      tls: PeerTls | None, pool: AssociationPool | None) -> EventAssociation:
    """A new association to ``peer`` with the request of ``payload`` sent on it (closed if that fails)."""
    context = tls.context_for(peer) if tls is not None else None
    association = (pool.open(calling_ae, peer, timeout, context) if pool is not None
                   else EventAssociation(calling_ae, peer, timeout, context).open())
    try:
        association.request(payload)
    except BaseException:
        association.close(release=False)
        raise
    return association


def _start(calling_ae: str, peer: Peer, payload: dict[str, Any], timeout: float,
           pool: AssociationPool | None, tls: PeerTls | None) -> _Exchange:
    """Send the request on the subscriber's kept association, or on a new one (raises when neither works)."""
    association = pool.take(peer) if pool is not None else None
    if association is not None:
        try:
            association.request(payload)
            return _Exchange(payload, association, reused=True)
        except (OSError, PeerFailure):  # the kept association went stale (the subscriber closed it)
            association.close(release=False)
    return _Exchange(payload, _open_and_request(calling_ae, peer, payload, timeout, tls, pool), reused=False)


def _finish(calling_ae: str, exchange: _Exchange, timeout: float, tls: PeerTls | None,
            pool: AssociationPool | None) -> EventAssociation:
    """Read the response; a kept association that turns out stale is replaced and the report sent again."""
    try:
        exchange.association.response(exchange.payload)
        return exchange.association
    except (OSError, PeerFailure):
        exchange.association.close(release=False)
        if not exchange.reused:
            raise
    association = _open_and_request(calling_ae, exchange.association.peer, exchange.payload, timeout, tls, pool)
    try:
        association.response(exchange.payload)
    except BaseException:
        association.close(release=False)
        raise
    return association


def _as_failure(peer: Peer, exc: BaseException) -> Exception:
    if isinstance(exc, PeerFailure):
        return exc
    if isinstance(exc, ssl.SSLError):
        return PeerFailure(f"{peer.ae_title}@{peer.host}:{peer.port}: TLS: {handshake_failure(exc)}")
    if isinstance(exc, OSError):
        return PeerFailure(f"{peer.ae_title}@{peer.host}:{peer.port}: {exc.strerror or exc}")
    raise exc


def deliver_many(calling_ae: str, batch: list[tuple[Peer, Event]], engine: Engine, timeout: float = 30.0,
                 clock: Callable[[], datetime] = datetime.now, drain_seconds: float = 5.0,
                 reader: Engine | None = None, pool: AssociationPool | None = None,
                 tls: PeerTls | None = None) -> Delivery:
    """Send each event of ``batch`` (the heads of their subscribers' keys, one per subscriber) and then
    the subscribers' due followers, for up to ``drain_seconds`` (kept well inside the claim's lease).

    The subscribers are served side by side: every request of a round is sent before any response is
    read, so one slow subscriber costs the round its own latency once, not once per subscriber before
    it. (One association carries one request at a time: no asynchronous operations are negotiated.)
    A head that was not delivered is in the answer's ``failures`` (the runner retries it); a follower
    that fails stays pending and is published again as its key's head, and the subscriber's other
    followers wait for it.

    Delivered UPS events leave the outbox: each batch of followers once answered, the earlier heads
    (done, marked by the runner) after a run that delivered followers and every :data:`FORGET_EVERY`
    th run. 100 subscribers x 1,000 changes would otherwise add 100,000 done rows, and the ordering
    check of every pending event (an earlier event of its key not yet done) walks the done rows of its
    key: the relay's search for due heads grew with them to seconds per poll (measured, SQLite).
    Failed events stay (``broker events failed`` / ``retry``), and so does the last done head of each
    subscriber.
    """
    delivery = Delivery()
    deadline = time.monotonic() + drain_seconds
    open_by_key: dict[str, EventAssociation] = {}
    exchanges: list[tuple[Event, _Exchange]] = []
    reserved, refused = pool.reserve([peer for peer, _ in batch]) if pool is not None else ([], set())
    try:
        for peer, event in batch:
            if peer.ae_title in refused:
                delivery.failures[event.id] = PeerFailure(
                    f"{peer.ae_title}: another process of the cluster keeps its association open")
                continue
            try:
                exchanges.append((event, _start(calling_ae, peer, event.payload, timeout, pool, tls)))
            except (OSError, PeerFailure) as exc:
                delivery.failures[event.id] = _as_failure(peer, exc)
        for event, exchange in exchanges:
            try:
                open_by_key[event.ordering_key] = _finish(calling_ae, exchange, timeout, tls, pool)
            except (OSError, PeerFailure) as exc:
                delivery.failures[event.id] = _as_failure(exchange.association.peer, exc)
        while open_by_key and time.monotonic() < deadline:
            # read on a reading engine: on SQLite it takes no write lock
            with (reader or engine).connect() as db:
                rows = list(db.execute(_DUE_FOLLOWERS, {"keys": sorted(open_by_key), "now": clock()}))
            if not rows:
                break
            queues: dict[str, list[Any]] = {}
            for row in rows:
                queues.setdefault(row.ordering_key, []).append(row)
            sent: list[int] = []
            try:
                _drain_side_by_side(queues, open_by_key, sent)
            finally:
                _forget_delivered(engine, sent)
                delivery.followers += len(sent)
    except BaseException:
        for association in [*open_by_key.values(), *(exchange.association for _, exchange in exchanges)]:
            association.close(release=False)  # closing twice is harmless
        raise
    finally:
        if pool is not None:
            pool.unreserve(reserved)
    for association in open_by_key.values():
        if pool is not None:
            pool.give(association.peer, association)
        else:
            association.close(release=True)
    delivered = [event for _, event in batch if event.id not in delivery.failures]
    if delivered and (delivery.followers or next(_runs) % FORGET_EVERY == 0):
        _forget_earlier_done(engine, delivered)
    if delivered:
        log.info("ups.events_delivered", subscribers=len(delivered), count=len(delivered) + delivery.followers)
    return delivery


def _drain_side_by_side(queues: dict[str, list[Any]], open_by_key: dict[str, EventAssociation],
                        sent: list[int]) -> None:
    """Rounds of one follower per subscriber: all requests of a round, then all responses. A subscriber
    whose follower fails leaves ``open_by_key`` (its association closed); its rest stay pending."""
    while queues:
        round_: list[tuple[str, Any]] = []
        for key, rows in list(queues.items()):
            row = rows.pop(0)
            if not rows:
                del queues[key]
            try:
                open_by_key[key].request(row.payload)
                round_.append((key, row))
            except (OSError, PeerFailure) as exc:
                _drop(key, open_by_key, queues, exc)
        for key, row in round_:
            if key not in open_by_key:
                continue
            try:
                open_by_key[key].response(row.payload)
                sent.append(row.id)
            except (OSError, PeerFailure) as exc:
                _drop(key, open_by_key, queues, exc)


def _drop(key: str, open_by_key: dict[str, EventAssociation], queues: dict[str, list[Any]],
          exc: BaseException) -> None:
    association = open_by_key.pop(key)
    association.close(release=False)
    queues.pop(key, None)
    log.warning("ups.event_follower_failed", subscriber=association.peer.ae_title, error=str(exc))


def _forget_delivered(engine: Engine, ids: list[int]) -> None:
    """Delivered followers leave the outbox (see :func:`deliver_many`)."""
    if ids:
        with engine.begin() as db:
            db.execute(_FORGET_DELIVERED, {"ids": ids})


def _forget_earlier_done(engine: Engine, heads: list[Event]) -> None:
    """The subscribers' earlier events that are done (the heads of earlier runs) leave the outbox."""
    with engine.begin() as db:
        db.execute(_FORGET_EARLIER_DONE, {"keys": sorted({e.ordering_key for e in heads}),
                                          "before": max(e.id for e in heads), "kind": heads[0].kind})


def deliver(calling_ae: str, peer: Peer, event: Event, engine: Engine, timeout: float = 30.0,
            clock: Callable[[], datetime] = datetime.now, drain_seconds: float = 5.0,
            reader: Engine | None = None, pool: AssociationPool | None = None, tls: PeerTls | None = None) -> int:
    """:func:`deliver_many` for one event; returns how many reports went out (the event and its
    followers), or raises :class:`PeerFailure` when ``event`` itself was not delivered."""
    delivery = deliver_many(calling_ae, [(peer, event)], engine, timeout, clock, drain_seconds, reader, pool, tls)
    if event.id in delivery.failures:
        raise delivery.failures[event.id]
    return 1 + delivery.followers


class EventAssociation:
    """A minimal association as requestor for N-EVENT-REPORTs: the UPS Event SOP Class, one request
    at a time, the PDUs of :mod:`broker.dicom.pdu` and the command sets of :mod:`broker.dicom.dimse`.

    pynetdicom costs ~1 ms of CPU per message in its polling threads (on the cores the broker shares);
    100 subscribers x 1,000 changes is 100,000 messages, so the broker speaks the little it needs itself.
    """

    def __init__(self, calling_ae: str, peer: Peer, timeout: float, tls: ssl.SSLContext | None = None) -> None:
        self.calling_ae = calling_ae
        self.peer = peer
        self.timeout = timeout
        self.tls = tls
        self.sock: socket.socket | None = None
        self.message_id = 0
        self.implicit = False
        self.peer_maximum = 16384
        self._buffer = bytearray()
        self.on_close: Callable[[], None] | None = None  # once closed (the pool's lease let go)

    def open(self) -> EventAssociation:
        """Connect and associate; raises OSError or :class:`PeerFailure`."""
        return self.__enter__()

    def close(self, release: bool) -> None:
        """A-RELEASE (``release``) or A-ABORT, then close the connection; never raises."""
        if release:
            self.__exit__(None, None, None)
        else:
            self.__exit__(PeerFailure, None, None)

    def __enter__(self) -> EventAssociation:
        sock = socket.create_connection((self.peer.host, self.peer.port), timeout=min(self.timeout, 10.0))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:  # the handshake, within the connect timeout, verifies the subscriber
                sock = self.tls.wrap_socket(sock, server_hostname=self.peer.host)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        self.sock = sock
        try:
            self._associate()
        except BaseException:
            sock.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        sock, self.sock = self.sock, None
        try:
            if sock is None:
                return
            try:
                if exc[0] is None:
                    sock.sendall(pdu.header(pdu.A_RELEASE_RQ, 4) + bytes(4))
                    self._read_pdu(sock)  # A-RELEASE-RP
                else:
                    sock.sendall(pdu.encode_abort(pdu.ABORT_SOURCE_SERVICE_USER, 0))
            except (OSError, PeerFailure):
                pass
            finally:
                sock.close()
        finally:
            on_close, self.on_close = self.on_close, None
            if on_close is not None:
                on_close()

    def _associate(self) -> None:
        assert self.sock is not None
        context = pdu.ProposedContext(1, UPS_EVENT, (ExplicitVRLittleEndian, ImplicitVRLittleEndian))
        self.sock.sendall(pdu.encode_associate_request(self.peer.ae_title, self.calling_ae, [context],
                                                       MAXIMUM_LENGTH, IMPLEMENTATION_CLASS_UID,
                                                       IMPLEMENTATION_VERSION_NAME))
        kind, answer = self._read_pdu(self.sock)
        if kind != pdu.A_ASSOCIATE_AC:
            raise PeerFailure(f"{self.peer.ae_title} did not accept the association (PDU type {kind:#04x})")
        accept = pdu.parse_associate_accept(answer)
        if accept.maximum_length is not None:
            self.peer_maximum = accept.maximum_length
        result = accept.results.get(context.context_id)
        if result is None or result.result != pdu.ACCEPTANCE:
            raise PeerFailure(f"{self.peer.ae_title} does not accept the UPS Event SOP Class")
        self.implicit = result.transfer_syntax == ImplicitVRLittleEndian

    def send(self, payload: dict[str, Any]) -> None:
        """One N-EVENT-REPORT; raises :class:`PeerFailure` for a failure status or no response."""
        self.request(payload)
        self.response(payload)

    def request(self, payload: dict[str, Any]) -> None:
        """Send the N-EVENT-REPORT request of ``payload`` (its response is read by :meth:`response`)."""
        assert self.sock is not None
        self.message_id = self.message_id % 0xFFFF + 1
        command = dimse.encode_command({
            "AffectedSOPClassUID": UPS_PUSH, "CommandField": dimse.N_EVENT_REPORT_RQ, "MessageID": self.message_id,
            "CommandDataSetType": dimse.DATA_SET_PRESENT, "AffectedSOPInstanceUID": payload["uid"],
            "EventTypeID": int(payload["event_type"])})
        data = dimse.encode_data_set(payload["info"], self.implicit)
        self.sock.sendall(pdu.encode_p_data(1, True, command, self.peer_maximum)
                          + pdu.encode_p_data(1, False, data, self.peer_maximum))

    def response(self, payload: dict[str, Any]) -> None:
        """Read the response to the request of ``payload``; raises :class:`PeerFailure` for a failure
        status, another PDU or a closed connection."""
        assert self.sock is not None
        command, elements, complete = bytearray(), None, False
        try:
            while not complete:
                kind, body = self._read_pdu(self.sock)
                if kind != pdu.P_DATA_TF:
                    raise PeerFailure(f"{self.peer.ae_title} answered with PDU type {kind:#04x}")
                for value in pdu.parse_p_data(body):
                    if value.is_command:
                        command += value.data
                        if value.is_last:
                            elements = dimse.command_values(bytes(command))
                            complete = dimse.us_value(elements, "CommandDataSetType",
                                                      dimse.NO_DATA_SET) == dimse.NO_DATA_SET
                    elif value.is_last:  # the end of an Event Reply data set (not needed)
                        complete = elements is not None
        except pdu.PduError as exc:
            raise PeerFailure(f"{self.peer.ae_title} answered with a malformed response: {exc}") from exc
        assert elements is not None
        code = dimse.us_value(elements, "Status", -1)
        if code < 0 or 0xA000 <= code <= 0xCFFF or code in (0x0110, 0x0112, 0x0113, 0x0122, 0x0211):
            raise PeerFailure(f"{self.peer.ae_title} answered N-EVENT-REPORT {payload['event_type']} with "
                              f"status {code:#06x}")

    def _read_pdu(self, sock: socket.socket) -> tuple[int, bytes]:
        head = self._read(sock, pdu.PDU_HEADER_LENGTH)
        kind, length = pdu.parse_header(head)
        return kind, self._read(sock, length)

    def _read(self, sock: socket.socket, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = sock.recv(max(65536, count - len(self._buffer)))
            if not chunk:
                raise PeerFailure(f"{self.peer.ae_title} closed the connection")
            self._buffer += chunk
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

