"""UPS N-EVENT-REPORTs to subscribers (PS3.4 CC.2.4): the handler of the ``ups.event`` outbox kind.

The subscriber's address is its entry in ``BROKER_DICOM_PEERS``. One association carries the event
the runner claimed and then, in order, the subscriber's other events that are due (for up to
:data:`DRAIN_SECONDS`): while the claimed event runs, the later events of its ordering key
(``ups-subscriber:<AE>``) are blocked for every other worker, so taking them here keeps the order and
spares an association per event. A subscriber that is down fails fast (connection refused) and only
its own key waits for the retry with backoff; the others' events go on.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from sqlalchemy import Engine, bindparam, delete, select

from broker.config import Peer, Settings
from broker.dicom import dimse, pdu
from broker.events.outbox import OUTBOX
from broker.events.runner import Event
from broker.outbound.dicom_peers import PeerFailure
from broker.store.session import make_engine

log = structlog.get_logger(__name__)

UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"
DRAIN_BATCH = 200  # followers read (and marked done) at a time
DRAIN_SECONDS = 5.0  # longest one claimed event keeps draining its subscriber's backlog
FORGET_EVERY = 8
# An association to a subscriber is kept open this long after its last event, for the next one: opening
# one per event (TCP, A-ASSOCIATE, A-RELEASE) was most of the worker's CPU per event at a steady rate.
IDLE_SECONDS = 20.0
_runs = itertools.count(1)
MAXIMUM_LENGTH = 65536
# As the broker's acceptor names itself (broker.dicom.server), without importing the server here.
IMPLEMENTATION_CLASS_UID = str(generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["worklist-broker"]))
IMPLEMENTATION_VERSION_NAME = "WLBROKER_UPS"


# Statements built once: building them cost more of the worker's CPU than running them (py-spy).
_DUE_FOLLOWERS = (select(OUTBOX.c.id, OUTBOX.c.payload).where(
    OUTBOX.c.ordering_key == bindparam("key"), OUTBOX.c.id > bindparam("after"), OUTBOX.c.status == "pending",
    OUTBOX.c.next_attempt_at <= bindparam("now")).order_by(OUTBOX.c.id).limit(DRAIN_BATCH))
_FORGET_DELIVERED = delete(OUTBOX).where(OUTBOX.c.id.in_(bindparam("ids", expanding=True)),
                                         OUTBOX.c.status == "pending")
_FORGET_EARLIER_DONE = delete(OUTBOX).where(OUTBOX.c.ordering_key == bindparam("key"),
                                            OUTBOX.c.id < bindparam("before"), OUTBOX.c.status == "done",
                                            OUTBOX.c.kind == bindparam("kind"))


class AssociationPool:
    """The open associations of this process, one per subscriber, between its events.

    Events of one subscriber run one at a time (their ordering key), so an association is used by one
    thread at a time: :meth:`take` removes it from the pool, :meth:`give` puts it back after a
    delivery that went well. One idle longer than :data:`IDLE_SECONDS` is released, not reused.
    """

    def __init__(self, idle_seconds: float = IDLE_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._open: dict[str, tuple[EventAssociation, float]] = {}

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
            previous = self._open.pop(peer.ae_title, None)
            self._open[peer.ae_title] = (association, time.monotonic())
        if previous is not None:
            previous[0].close(release=True)


class UnknownSubscriber(Exception):
    """The subscriber's AE title is not (or no longer) in ``BROKER_DICOM_PEERS``."""


def build_ups_event_handler(settings: Settings, engine: Engine,
                            clock: Callable[[], datetime] = datetime.now) -> Callable[[Event], None]:
    peers = settings.peers
    readers: list[Engine] = []  # made on first use: most processes never deliver a UPS event
    pool = AssociationPool()

    def ups_event(event: Event) -> None:
        subscriber = event.payload["subscriber"]
        peer = peers.get(subscriber)
        if peer is None:
            raise UnknownSubscriber(f"{subscriber} is not in BROKER_DICOM_PEERS")
        if not readers:
            readers.append(make_engine(settings.database_url, pool_size=4, for_reading=True))
        deliver(settings.ae_title, peer, event, engine, settings.dicom_dimse_timeout, clock,
                drain_seconds=min(DRAIN_SECONDS, settings.event_lease_seconds / 4), reader=readers[0], pool=pool)

    return ups_event


def _due_followers(engine: Engine, ordering_key: str, after: int, now: datetime) -> list[Any]:
    with engine.connect() as db:
        return list(db.execute(_DUE_FOLLOWERS, {"key": ordering_key, "after": after, "now": now}))


def _forget_delivered(engine: Engine, ids: list[int]) -> None:
    """Delivered followers leave the outbox (see :func:`deliver`)."""
    if ids:
        with engine.begin() as db:
            db.execute(_FORGET_DELIVERED, {"ids": ids})


def _forget_earlier_done(engine: Engine, event: Event) -> None:
    """The subscriber's earlier events that are done (the heads of earlier runs) leave the outbox.
    Every :data:`FORGET_EVERY` th run of a process (a transaction each time would cost more than
    the few done rows it removes), and after every run that delivered followers."""
    with engine.begin() as db:
        db.execute(_FORGET_EARLIER_DONE, {"key": event.ordering_key, "before": event.id, "kind": event.kind})


def deliver(calling_ae: str, peer: Peer, event: Event, engine: Engine, timeout: float = 30.0,
            clock: Callable[[], datetime] = datetime.now, drain_seconds: float = 5.0,
            reader: Engine | None = None, pool: AssociationPool | None = None) -> int:
    """Send ``event`` and then the subscriber's due followers on one association, for up to
    ``drain_seconds`` (kept well inside the claim's lease); returns how many were delivered.

    Raises :class:`PeerFailure` when ``event`` itself was not delivered (the runner retries it); a
    follower that fails stays pending and is published again as the key's head.

    Delivered UPS events leave the outbox: a batch of followers once answered, the earlier heads
    (done, marked by the runner) at the end of a run. 100 subscribers x 1,000 changes would otherwise
    add 100,000 done rows, and the ordering check of every pending event (an earlier event of its key
    not yet done) walks the done rows of its key: the relay's search for due heads grew with them to
    seconds per poll (measured, SQLite), holding the write lock. Draining a subscriber's backlog here,
    rather than one task per event, also keeps the pending rows few. Failed events stay (``broker
    events failed`` / ``retry``), and so does the last done head of each subscriber.
    """
    delivered = 0
    head_sent = False
    deadline = time.monotonic() + drain_seconds
    association = pool.take(peer) if pool is not None else None
    try:
        if association is not None:
            try:
                association.send(event.payload)
                head_sent = True
            except (OSError, PeerFailure):  # the kept association went stale (the subscriber closed it)
                association.close(release=False)
                association = None
        if association is None:
            association = EventAssociation(calling_ae, peer, timeout).open()
            association.send(event.payload)
            head_sent = True
        after = event.id
        while time.monotonic() < deadline:
            # read on a reading engine: on SQLite it takes no write lock
            followers = _due_followers(reader or engine, event.ordering_key, after, clock())
            if not followers:
                break
            sent: list[int] = []
            try:
                for follower in followers:
                    association.send(follower.payload)
                    sent.append(follower.id)
            finally:
                _forget_delivered(engine, sent)
                delivered += len(sent)
            after = followers[-1].id
    except (OSError, PeerFailure) as exc:
        if association is not None:
            association.close(release=False)
            association = None
        if not head_sent:
            if isinstance(exc, PeerFailure):
                raise
            raise PeerFailure(f"{peer.ae_title}@{peer.host}:{peer.port}: {exc.strerror or exc}") from exc
        log.warning("ups.event_follower_failed", subscriber=peer.ae_title, error=str(exc))
    except BaseException:
        if association is not None:
            association.close(release=False)
        raise
    if association is not None:
        if pool is not None:
            pool.give(peer, association)
        else:
            association.close(release=True)
    if delivered or next(_runs) % FORGET_EVERY == 0:
        _forget_earlier_done(engine, event)
    log.info("ups.events_delivered", subscriber=peer.ae_title, count=1 + delivered)
    return 1 + delivered


class EventAssociation:
    """A minimal association as requestor for N-EVENT-REPORTs: the UPS Event SOP Class, one request
    at a time, the PDUs of :mod:`broker.dicom.pdu` and the command sets of :mod:`broker.dicom.dimse`.

    pynetdicom costs ~1 ms of CPU per message in its polling threads (on the cores the broker shares);
    100 subscribers x 1,000 changes is 100,000 messages, so the broker speaks the little it needs itself.
    """

    def __init__(self, calling_ae: str, peer: Peer, timeout: float) -> None:
        self.calling_ae = calling_ae
        self.peer = peer
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.message_id = 0
        self.implicit = False
        self.peer_maximum = 16384
        self._buffer = bytearray()

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
        sock.settimeout(self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        try:
            self._associate()
        except BaseException:
            sock.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            if exc[0] is None:
                sock.sendall(pdu.header(pdu.A_RELEASE_RQ, 4) + bytes(4))
                self._read_pdu(sock)  # A-RELEASE-RP
            else:
                sock.sendall(pdu.encode_abort(pdu.ABORT_SOURCE_SERVICE_USER, 0))
        except OSError:
            pass
        finally:
            sock.close()

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
        assert self.sock is not None
        self.message_id = self.message_id % 0xFFFF + 1
        command = dimse.encode_command({
            "AffectedSOPClassUID": UPS_PUSH, "CommandField": dimse.N_EVENT_REPORT_RQ, "MessageID": self.message_id,
            "CommandDataSetType": dimse.DATA_SET_PRESENT, "AffectedSOPInstanceUID": payload["uid"],
            "EventTypeID": int(payload["event_type"])})
        data = dimse.encode_data_set(payload["info"], self.implicit)
        self.sock.sendall(pdu.encode_p_data(1, True, command, self.peer_maximum)
                          + pdu.encode_p_data(1, False, data, self.peer_maximum))
        assembler = dimse.MessageAssembler()
        while True:
            kind, body = self._read_pdu(self.sock)
            if kind != pdu.P_DATA_TF:
                raise PeerFailure(f"{self.peer.ae_title} answered with PDU type {kind:#04x}")
            messages = assembler.add(pdu.parse_p_data(body))
            if messages:
                break
        code = int(messages[0].command.get("Status", -1))
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

