"""The UPS-RS subscription channel (PS3.18 8.10.4 Open Notification Connection, 11.13 Workitem Event
Reports): a WebSocket per subscriber AE over which the broker sends the AE's UPS event reports.

Where the reports come from: a subscription made over UPS-RS puts its AE on the WebSocket channel
(``ups_subscriptions.channel``), and every report for it is an outbox row of kind ``ups.ws_event`` with
the ordering key ``ups-subscriber:<AE>`` (:mod:`broker.domain.ups_notify`): the same payload, the same
order and the same durability as a DIMSE subscriber's ``ups.event``. The relay never publishes those
rows; they wait until a channel for the AE is open, so a subscriber that reconnects gets what it
missed, in order, once (at least once: a report sent just before a connection broke, not yet marked
done, comes again).

Who sends: the :class:`ChannelHub` of the process. One loop serves all the process's channels: each
round it marks the reports the channels sent as done (one transaction), reads the pending reports of
every idle channel's key (one query, in ``id`` order) and hands each channel its own to send, in a
task of its own (a slow client holds back no other). It wakes when this process commits a report for
one of its keys (:func:`broker.outbox.consumer.watch`) and polls every :data:`POLL_SECONDS` for those
other processes and nodes commit.

One channel per AE in the whole cluster: a channel holds the lease ``ups-channel:<AE>``
(:class:`broker.cluster.handoff.HandOffLeases`, renewed while open). A new channel for an AE that
already has one takes over (PS3.18 8.10.4.2: the user agent re-establishes a lost connection by
opening it again, and the server may not yet know the old one is dead): the old channel, on this node
or another, is closed with code :data:`TAKEN_OVER` and the new one starts once it let go of the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import structlog
from sqlalchemy import Engine
from starlette.websockets import WebSocket, WebSocketState

from broker.cluster.handoff import HandOffLeases
from broker.dicom_json import element, tag_of
from broker.domain import ups_notify, ups_view
from broker.outbox import consumer
from broker.outbox.outbox import UPS_WS_EVENT
from broker.outbox.runner import Event

log = structlog.get_logger(__name__)

POLL_SECONDS = 0.25
"""How often the hub looks for reports other processes committed."""
RECHECK_SECONDS = 0.02
"""A wake-up comes just before the database commits: a round that found nothing looks again this soon."""
LEASE_SECONDS = 6.0
"""The channel lease: renewed every third of it; a dead node's channel is taken over after it."""
HAND_OVER_WAIT = LEASE_SECONDS + 1.0
"""How long a new channel waits for the old one's holder to let go (or its lease to expire)."""
LEASE_CHECK_SECONDS = 0.2
"""How often the hub renews its leases and looks for requests to let go (one indexed query)."""
ROUND_LIMIT = 1000
"""At most this many reports per round, over all channels."""
TAKEN_OVER = 4001
"""Close code (private use, RFC 6455 7.4.2): a newer channel for the same AE took over."""
TAKEN_OVER_REASON = "a newer channel for this AE took over"

def lease_name(ae_title: str) -> str:
    return f"ups-channel:{ae_title}"


def report(event: Event) -> str:
    """The text message of one event report (PS3.18 11.13): a DICOM JSON dataset holding the command
    attributes of the N-EVENT-REPORT (Affected SOP Class UID: UPS Event; Message ID; Affected SOP Instance
    UID: the workitem, or the well-known global UID for an SCP status change; Event Type ID) and the
    event information, as the DIMSE subscriber gets it."""
    payload = event.payload
    message: dict[str, Any] = {
        tag_of("AffectedSOPClassUID"): element("AffectedSOPClassUID", ups_view.UPS_EVENT),
        tag_of("MessageID"): element("MessageID", (event.id - 1) % 0xFFFF + 1),
        tag_of("AffectedSOPInstanceUID"): element("AffectedSOPInstanceUID", payload["uid"]),
        tag_of("EventTypeID"): element("EventTypeID", int(payload["event_type"])),
        **payload.get("info", {}),
    }
    return orjson.dumps(dict(sorted(message.items()))).decode()


@dataclass(eq=False)
class Channel:
    """One open channel: its AE, its WebSocket, and whether a send is under way."""

    ae_title: str
    websocket: WebSocket
    key: str = ""
    sending: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int = 1000
    close_reason: str = ""
    wake: Any = None  # what the outbox's commit listener calls for this channel's key

    def __post_init__(self) -> None:
        self.key = ups_notify.ordering_key(self.ae_title)

    def end(self, code: int = 1000, reason: str = "") -> None:
        """Ask the channel to close (it closes its WebSocket on the way out)."""
        if not self.closed.is_set():
            self.close_code, self.close_reason = code, reason
            self.closed.set()


class ChannelHub:
    """The WebSocket channels open in this process and the loop that feeds them (see the module)."""

    def __init__(self, read_engine: Engine, write_engine: Engine, holder: str) -> None:
        self.read_engine = read_engine
        self.write_engine = write_engine
        self.leases = HandOffLeases(write_engine, holder, LEASE_SECONDS, reader=read_engine)
        self.channels: dict[str, Channel] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._sent: list[int] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._lease_checked = 0.0

    # --- opening and closing ----------------------------------------------------------------------
    async def open(self, ae_title: str, websocket: WebSocket) -> Channel | None:
        """Take the AE's channel: end the one open here, ask another node's holder to let go, wait for
        the lease, accept the WebSocket; returns the new channel (to :meth:`serve`), or None when the
        lease did not come (the WebSocket is not accepted then) or the client left meanwhile."""
        lock = self._opening.setdefault(ae_title, asyncio.Lock())
        async with lock:
            old = self.channels.get(ae_title)
            if old is not None:
                old.end(TAKEN_OVER, TAKEN_OVER_REASON)
                while self.channels.get(ae_title) is old:
                    await asyncio.sleep(0.01)
            got = await asyncio.to_thread(self.leases.acquire, lease_name(ae_title), HAND_OVER_WAIT)
            if not got:
                return None
            try:
                await websocket.accept()
            except Exception as exc:  # the client left while it waited for the lease
                log.info("dicomweb.channel_gone", subscriber=ae_title, error=type(exc).__name__)
                await asyncio.to_thread(self.leases.release, lease_name(ae_title))
                return None
            channel = Channel(ae_title, websocket)
            self.channels[ae_title] = channel
        channel.wake = self._waker(asyncio.get_running_loop())
        consumer.watch(channel.key, channel.wake)
        self._ensure_loop()
        return channel

    async def serve(self, channel: Channel) -> None:
        """Until the client leaves, the server stops or a newer channel takes over: the loop sends the
        reports; this reads (and ignores) what the client sends, to see it leave."""
        reader = asyncio.create_task(self._read(channel))
        try:
            await channel.closed.wait()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            while channel.sending:  # let a send under way finish (its reports are counted as sent)
                await asyncio.sleep(0.01)
            consumer.unwatch(channel.key, channel.wake)
            if self.channels.get(channel.ae_title) is channel:
                del self.channels[channel.ae_title]
            if channel.websocket.application_state == WebSocketState.CONNECTED and \
                    channel.websocket.client_state == WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await channel.websocket.close(channel.close_code, channel.close_reason or None)
            await self._flush_sent()
            await asyncio.to_thread(self.leases.release, lease_name(channel.ae_title))
            log.info("dicomweb.channel_closed", subscriber=channel.ae_title, code=channel.close_code)

    @staticmethod
    async def _read(channel: Channel) -> None:
        try:
            while True:
                message = await channel.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
        except Exception:  # the connection is gone, whatever the server says
            pass
        channel.end(1000)

    def _waker(self, loop: asyncio.AbstractEventLoop) -> Any:
        def wake() -> None:  # from the committing thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped
                loop.call_soon_threadsafe(self._wake.set)
        return wake

    # --- the delivery loop ------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run(), name="ups-channels")

    async def _run(self) -> None:
        while self.channels or self._sent or self._sends:
            try:
                woken = self._wake.is_set()
                self._wake.clear()
                await self._check_leases()
                found = await self._round()
                if not found and woken:
                    await asyncio.sleep(RECHECK_SECONDS)
                    found = await self._round()
                if found:
                    continue
            except Exception:
                log.exception("dicomweb.channel_round_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)

    async def _round(self) -> bool:
        """Mark what was sent as done, read the idle channels' pending reports and start sending them;
        returns whether any were. (Marked first: a channel whose send just ended would read them again.)"""
        await self._flush_sent()
        idle = {channel.key: channel for channel in self.channels.values()
                if not channel.sending and not channel.closed.is_set()}
        if not idle:
            return False
        events = await asyncio.to_thread(consumer.pending, self.read_engine, sorted(idle), UPS_WS_EVENT, ROUND_LIMIT)
        by_key: dict[str, list[Event]] = {}
        for event in events:
            by_key.setdefault(event.ordering_key, []).append(event)
        for key, batch in by_key.items():
            channel = idle[key]
            channel.sending = True
            task = asyncio.create_task(self._send(channel, batch))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        return bool(events)

    async def _send(self, channel: Channel, batch: list[Event]) -> None:
        try:
            for event in batch:
                if channel.closed.is_set():
                    break
                await channel.websocket.send_text(report(event))
                self._sent.append(event.id)
        except Exception as exc:  # the client went away mid-batch: the rest stays pending
            log.info("dicomweb.channel_send_failed", subscriber=channel.ae_title, error=type(exc).__name__)
            channel.end(1011)
        finally:
            channel.sending = False
            self._wake.set()  # the sent ones are marked and the next ones read at once

    async def _flush_sent(self) -> None:
        if not self._sent:
            return
        sent, self._sent = self._sent, []
        try:
            await asyncio.to_thread(consumer.mark_done, self.write_engine, sent, datetime.now())
        except Exception:
            self._sent = sent + self._sent  # the database is away: marked at the next round
            raise

    async def _check_leases(self) -> None:
        """Renew the leases now and then, and end the channels another node asked for or took."""
        if time.monotonic() - self._lease_checked < LEASE_CHECK_SECONDS or not self.channels:
            return
        self._lease_checked = time.monotonic()
        wanted, lost = await asyncio.to_thread(self.leases.check)
        for name in wanted | lost:
            for channel in list(self.channels.values()):
                if lease_name(channel.ae_title) == name:
                    log.info("dicomweb.channel_taken_over", subscriber=channel.ae_title, lost=name in lost)
                    channel.end(TAKEN_OVER, TAKEN_OVER_REASON)


_HUB_LOCK = threading.Lock()


def hub_of(state: Any, read_engine: Engine, write_engine: Engine, holder: str) -> ChannelHub:
    """The application's hub (made on first use)."""
    with _HUB_LOCK:
        hub: ChannelHub | None = getattr(state, "ups_channels", None)
        if hub is None:
            hub = ChannelHub(read_engine, write_engine, holder)
            state.ups_channels = hub
    return hub


__all__ = ["TAKEN_OVER", "Channel", "ChannelHub", "hub_of", "lease_name", "report"]
