"""Live procedure changes for the status board: one poller per web process, fanned out to every
subscriber (server-sent events).

The web process may not be the process that changes procedures (``broker web`` runs alone, HL7 and
DICOM may run in other processes), so it watches the database: every ``interval`` seconds one
background task reads the procedure transitions and the procedures that are new since the last look
(by increasing id, with a look back for late commits), and sends the changed procedures' summaries to
each subscriber's queue. The task runs only while someone listens. Changes that make no transition (a
reschedule, a patient update) are not pushed: the board reloads its list every minute as well.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from sqlalchemy import Engine, func, select

from broker.store.tables import ProcedureTransition, table_of
from broker.web.listing import PROCEDURES, summaries

log = structlog.get_logger(__name__)
TRANSITIONS = table_of(ProcedureTransition)
QUEUE_LIMIT = 1000  # a subscriber that stops reading loses its stream, not the process's memory


class LiveFeed:
    """Subscribers get lists of changed procedure summaries."""

    def __init__(self, engine: Engine, interval: float = 0.5) -> None:
        self.engine = engine
        self.interval = interval
        self._subscribers: set[asyncio.Queue[list[dict[str, Any]] | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._marks: tuple[_IdWindow, _IdWindow] | None = None

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def subscribe(self) -> asyncio.Queue[list[dict[str, Any]] | None]:
        """A queue that gets every change committed from now on (the poller has marked where it stands
        when this returns, so a client that reloads its list after subscribing misses nothing)."""
        queue: asyncio.Queue[list[dict[str, Any]] | None] = asyncio.Queue(QUEUE_LIMIT)
        if self._task is None or self._task.done():
            self._marks = None
            await asyncio.to_thread(self.poll)  # marks only
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._run(), name="web-live-feed")
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[list[dict[str, Any]] | None]) -> None:
        self._subscribers.discard(queue)

    async def close(self) -> None:
        """End every stream (None tells a subscriber to stop) and the poller."""
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._subscribers.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while self._subscribers:  # nobody listens: the task ends; the next subscriber marks afresh
            try:
                changed = await asyncio.to_thread(self.poll)
            except Exception as exc:  # the database is away: keep the streams, try again
                log.warning("web.live_poll_failed", error=type(exc).__name__)
                changed = []
            if changed:
                for queue in list(self._subscribers):
                    try:
                        queue.put_nowait(changed)
                    except asyncio.QueueFull:
                        self._subscribers.discard(queue)
                        with contextlib.suppress(asyncio.QueueEmpty):
                            queue.get_nowait()
                        queue.put_nowait(None)
            await asyncio.sleep(self.interval)

    def poll(self) -> list[dict[str, Any]]:
        """The summaries of procedures changed since the previous call (the first call marks only).

        Reads by primary key only (cheap at any table size): transitions and procedures with an id
        above the last one seen minus :data:`LOOKBACK_IDS`, skipping ids already reported. The look
        back catches a row whose id was taken before a higher one that committed first (PostgreSQL
        sequences under concurrent transactions).
        """
        with self.engine.connect() as db:
            if self._marks is None:
                marks = []
                for column in (TRANSITIONS.c.id, PROCEDURES.c.id):
                    window = _IdWindow(db.execute(select(func.coalesce(func.max(column), 0))).scalar_one())
                    window.new((i, i) for i in db.scalars(select(column).where(column > window.floor)))
                    marks.append(window)
                self._marks = (marks[0], marks[1])
                return []
            transitions, procedures = self._marks
            moved = transitions.new(db.execute(select(TRANSITIONS.c.id, TRANSITIONS.c.procedure_fk)
                                               .where(TRANSITIONS.c.id > transitions.floor)))
            added = procedures.new(db.execute(select(PROCEDURES.c.id, PROCEDURES.c.id)
                                              .where(PROCEDURES.c.id > procedures.floor)))
            changed = set(moved) | set(added)
            return summaries(db, changed) if changed else []


LOOKBACK_IDS = 500


class _IdWindow:
    """The ids seen near the top of a table: what is new, with a look back of :data:`LOOKBACK_IDS`."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.seen: set[int] = set()

    @property
    def floor(self) -> int:
        return max(0, self.top - LOOKBACK_IDS)

    def new(self, rows: Any) -> list[int]:
        """For (id, procedure id) rows above the floor: the procedure ids of rows not seen before."""
        fresh = [(row[0], row[1]) for row in rows if row[0] not in self.seen]
        for ident, _ in fresh:
            self.seen.add(ident)
            self.top = max(self.top, ident)
        floor = self.floor
        self.seen = {i for i in self.seen if i > floor}
        return [procedure for _, procedure in fresh]
