"""Delivers the audit outbox to the Audit Record Repository, and deletes records past their retention.

One thread in ``broker run``. It reads undelivered ``audit_records`` lowest ``id`` first, writes each
as a DICOM audit message in an RFC 5424 syslog message, sends a batch over one persistent TLS
connection (RFC 5425) or as datagrams (RFC 5426), and only then marks the batch delivered. A failed
send is retried after a back-off that doubles up to ``audit_retry_max`` seconds, for ever: a record is
never given up, and nothing later is sent before it (order is kept).

Delivery is at least once: when the connection breaks during or right after a send, the batch is sent
again, so the repository may receive a record twice (same content, same EventDateTime). Over UDP
nothing tells whether a datagram arrived; a record is delivered once handed to the network.

With ``audit_repository`` empty nothing is sent; the records stay in the database (``broker audit``,
``GET /api/audit``) until their retention ends.

In a cluster every node runs a shipper, but only the holder of the lease ``audit-shipper`` sends: two
senders would send the same records twice and out of order. The others stand by, asking for the lease
about once a second, and one takes over when the holder stops (it releases the lease) or dies (its
lease expires after ``cluster_lease_seconds``). The holder renews it every third of that, also while
it backs off from an unreachable repository. The retention pass is a periodic job of ``broker run``
(:func:`apply_retention`, on one node at a time: :mod:`broker.cluster.periodic`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import datetime, timedelta

import structlog
from sqlalchemy import Engine, delete, func, select, update

from broker.audit.events import SUCCESS
from broker.audit.stored import from_json
from broker.audit.syslog import MAX_DATAGRAM, TlsSender, UdpSender, message
from broker.audit.xml import render
from broker.cluster import leases
from broker.cluster.nodes import node_id_for
from broker.config import Settings
from broker.store.tables import AuditRecord, AuditRecordPatient, table_of
from broker.tls import client_context

log = structlog.get_logger(__name__)

_records = table_of(AuditRecord)
_patients = table_of(AuditRecordPatient)
BATCH = 500
IDLE_POLL = 0.25
"""Seconds between looks at the outbox when it was empty."""
RETENTION_EVERY = 3600.0
"""Seconds between two retention passes (and one at start)."""
LEASE = "audit-shipper"
STANDBY_POLL = 1.0
"""Seconds between a standing-by shipper's asks for the lease (at most; less for short leases)."""


def source_id(settings: Settings) -> str:
    """AuditSourceID: the configured one, else ``<AE title>@<host name>``."""
    return settings.audit_source_id or f"{settings.ae_title}@{socket.gethostname()}"


def retention_cutoff(retention_days: int, now: datetime) -> datetime:
    """Records recorded before this moment are past their retention (kept: exactly ``retention_days`` old)."""
    return now - timedelta(days=retention_days)


def purge_expired(engine: Engine, retention_days: int, now: datetime) -> int:
    """Delete records older than ``retention_days``, delivered or not; returns how many."""
    cutoff = retention_cutoff(retention_days, now)
    old = select(_records.c.id).where(_records.c.recorded_at < cutoff)
    with engine.begin() as db:
        undelivered = db.execute(select(func.count()).select_from(_records).where(
            _records.c.recorded_at < cutoff, _records.c.delivered_at.is_(None))).scalar_one()
        db.execute(delete(_patients).where(_patients.c.record_id.in_(old)))
        deleted = db.execute(delete(_records).where(_records.c.recorded_at < cutoff)).rowcount
    if undelivered:
        log.warning("audit.expired_undelivered", count=undelivered, retention_days=retention_days)
    if deleted:
        log.info("audit.expired", count=deleted, retention_days=retention_days)
    return int(deleted or 0)


def apply_retention(settings: Settings, engine: Engine) -> int:
    """The retention pass (a periodic job of ``broker run``): :func:`purge_expired` with the settings."""
    return purge_expired(engine, settings.audit_retention_days, datetime.now())


class AuditShipper:
    """Sends the undelivered records while it holds the lease ``audit-shipper`` (``holder``: this node,
    by default); :meth:`start` runs it in a thread until :meth:`stop`."""

    def __init__(self, settings: Settings, engine: Engine, holder: str | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.holder = holder or node_id_for(settings)
        self.lease_seconds = settings.cluster_lease_seconds
        self.active = False  # holds the lease: this node's shipper is the one that sends
        self._destination = settings.audit_destination
        self._source_id = source_id(settings)
        self._hostname = socket.gethostname()
        self._procid = str(os.getpid())
        self._sender: TlsSender | UdpSender | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _connect(self) -> TlsSender | UdpSender:
        if self._sender is None:
            assert self._destination is not None
            transport, host, port = self._destination
            if transport == "tls":
                self._sender = TlsSender(host, port, client_context(self.settings),
                                         max(self.settings.tls_handshake_timeout, 1.0))
            else:
                self._sender = UdpSender(host, port)
        return self._sender

    def ship_once(self) -> int:
        """Send one batch of undelivered records; returns how many were delivered (raises on failure)."""
        if self._destination is None:
            return 0
        with self.engine.connect() as db:
            rows = db.execute(select(_records.c.id, _records.c.recorded_at, _records.c.event)
                              .where(_records.c.delivered_at.is_(None))
                              .order_by(_records.c.id).limit(BATCH)).all()
        if not rows:
            return 0
        frames = []
        for row in rows:
            event = from_json(row.event)
            xml = render(event, source_id=self._source_id, site_id=self.settings.audit_enterprise_site_id,
                         when=row.recorded_at)
            frames.append(message(xml, when=row.recorded_at, hostname=self._hostname, app_name="broker",
                                  procid=self._procid, failed=event.outcome != SUCCESS))
        if self._destination[0] == "udp":
            too_large = [row.id for row, frame in zip(rows, frames, strict=True) if len(frame) > MAX_DATAGRAM]
            if too_large:
                log.error("audit.datagram_too_large", record_ids=too_large, limit=MAX_DATAGRAM)
                frames = [frame for frame in frames if len(frame) <= MAX_DATAGRAM]
        ids = [row.id for row in rows]
        try:
            self._connect().send(frames)
        except Exception:
            with self.engine.begin() as db:
                db.execute(update(_records).where(_records.c.id.in_(ids))
                           .values(attempts=_records.c.attempts + 1))
            raise
        with self.engine.begin() as db:
            db.execute(update(_records).where(_records.c.id.in_(ids))
                       .values(delivered_at=datetime.now(), attempts=_records.c.attempts + 1))
        return len(ids)

    def _hold_lease(self) -> bool:
        """Take or renew the lease; logs when this shipper becomes the sender or stands by."""
        try:
            holding = leases.try_acquire(self.engine, LEASE, self.holder, self.lease_seconds)
        except Exception as exc:  # the database is away: sending needs it too; try again later
            log.warning("audit.lease_failed", error=type(exc).__name__)
            holding = False
        if holding != self.active:
            log.info("audit.shipper_active" if holding else "audit.shipper_standby", holder=self.holder)
            self.active = holding
        return holding

    def run(self) -> None:
        """Ship until :meth:`stop` while holding the lease, backing off after failures; stand by without it."""
        delay = 0.0
        failures = 0
        renew_every = self.lease_seconds / 3
        standby_poll = min(STANDBY_POLL, renew_every)
        renewed = -renew_every
        retry_at = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if not self.active or now - renewed >= renew_every:
                if not self._hold_lease():
                    self._stop.wait(standby_poll)
                    continue
                renewed = now
            if now < retry_at:  # backing off; woken in time to renew the lease meanwhile
                self._stop.wait(min(retry_at - now, max(0.0, renewed + renew_every - now)))
                continue
            try:
                sent = self.ship_once()
            except Exception as exc:  # repository or database unreachable: back off, retry for ever
                failures += 1
                delay = min(self.settings.audit_retry_max, max(delay * 2, 0.25))
                log.warning("audit.delivery_failed", error=type(exc).__name__, reason=str(exc)[:200],
                            attempt=failures, retry_in=delay)
                retry_at = time.monotonic() + delay
                continue
            if failures:
                log.info("audit.delivery_resumed", after_failures=failures)
                failures, delay = 0, 0.0
            if sent < BATCH:
                self._stop.wait(IDLE_POLL)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="audit-shipper", daemon=True)
        self._thread.start()

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stop after the batch in flight; then, if this shipper holds (or can take) the lease, for up to
        ``drain_seconds`` send what is still waiting (the Application Stop record, recorded just before),
        and let the lease go so that another node's shipper takes over at once. What is left is sent by
        that node, or by the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + drain_seconds
        sending = drain_seconds > 0 and self._destination is not None and self._hold_lease()
        while sending and time.monotonic() < deadline:
            try:
                if self.ship_once() == 0:
                    break
            except Exception as exc:  # the repository is away: the records wait for the next start
                log.warning("audit.delivery_failed", error=type(exc).__name__, reason=str(exc)[:200], at_stop=True)
                break
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        if self.active:
            try:
                leases.release(self.engine, LEASE, self.holder)
            except Exception as exc:  # the lease expires by itself
                log.warning("audit.lease_failed", error=type(exc).__name__, at_stop=True)
            self.active = False

