"""``run_event``: perform one outbox event at least once, idempotently by its event id.

The same function runs in a Celery worker (Redis) and in the broker's in-process worker threads.
A task may be delivered twice (acks late, redelivery after a lost worker, the relay publishing again
after a lease expired): the claim makes only one run at a time, and a done event is never run again.

1. Claim in a short transaction: status running, ``lease_until = now + event_lease_seconds``,
   attempts + 1 (an attempt counts when it starts, so a worker that dies mid-task, e.g. killed on
   the same poison event every time, still uses up the attempts). On PostgreSQL the row is read
   ``FOR UPDATE SKIP LOCKED`` (a concurrent claimer skips it at once); the UPDATE is conditional on
   the row still being claimable (pending, or running with an expired lease) and its rowcount
   decides, which is what makes it safe on SQLite too. A running row whose lease expired after its
   last allowed attempt is not run again: it becomes failed.
2. Ordering: while an earlier event with the same ``ordering_key`` is not done, the event stays
   pending (the relay publishes only the head of each key, so it comes back when its turn comes).
3. Run the handler for its kind outside any transaction (it talks to the network).
4. Done; or a retry after ``min(event_backoff_max, event_backoff_base * 2**(attempts-1))``
   seconds; after ``event_max_attempts`` the event is failed (``broker events failed`` shows it).
5. A done event runs the next pending event of its key at once, so an order's status messages do
   not wait for a poll between them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Engine, and_, bindparam, exists, or_, select, update

from broker.events.outbox import OUTBOX
from broker.store.tables import OutboxEvent, table_of

log = structlog.get_logger(__name__)

_EARLIER = table_of(OutboxEvent).alias("earlier")
# Handlers get the event; they raise to ask for a retry.
Handler = Callable[["Event"], None]


@dataclass(frozen=True)
class Event:
    """An outbox row as a handler sees it."""

    id: int
    event_id: str
    kind: str
    payload: dict[str, Any]
    ordering_key: str
    attempts: int


@dataclass(frozen=True)
class RetryPolicy:
    """``event_max_attempts``, ``event_backoff_base``, ``event_backoff_max``, ``event_lease_seconds``."""

    max_attempts: int = 10
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    lease_seconds: float = 60.0


def backoff_delay(attempts: int, base: float, maximum: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: base, 2 base, 4 base, ... at most maximum."""
    return float(min(maximum, base * 2 ** max(0, attempts - 1)))


def blocked_by_earlier() -> Any:
    """SQL condition: an earlier event with the same (non-empty) ordering key is not done yet."""
    return exists().where(_EARLIER.c.ordering_key == OUTBOX.c.ordering_key, OUTBOX.c.ordering_key != "",
                          _EARLIER.c.id < OUTBOX.c.id, _EARLIER.c.status != "done")


# The runner's statements, built once: building a statement and its cache key cost more CPU than
# running it (a third of the worker's Python time per event, measured with py-spy).
_CLAIM_READ = select(OUTBOX, blocked_by_earlier().label("blocked")).where(OUTBOX.c.event_id == bindparam("event_id"))
_CLAIM_READ_LOCKING = _CLAIM_READ.with_for_update(skip_locked=True, of=OUTBOX)
_CLAIMABLE = or_(OUTBOX.c.status == "pending",
                 and_(OUTBOX.c.status == "running", OUTBOX.c.lease_until < bindparam("now")))
_RELEASE_PENDING = (update(OUTBOX).where(OUTBOX.c.id == bindparam("pk"), OUTBOX.c.status == "pending")
                    .values(lease_until=None))
_RELEASE = update(OUTBOX).where(OUTBOX.c.id == bindparam("pk")).values(lease_until=None)
_FAIL_LOST = (update(OUTBOX).where(OUTBOX.c.id == bindparam("pk"), _CLAIMABLE)
              .values(status="failed", lease_until=None, last_error=bindparam("error")))
_TAKE = (update(OUTBOX).where(OUTBOX.c.id == bindparam("pk"), _CLAIMABLE)
         .values(status="running", attempts=OUTBOX.c.attempts + 1, lease_until=bindparam("until")))
_DONE = (update(OUTBOX).where(OUTBOX.c.id == bindparam("pk"), OUTBOX.c.status != "done")
         .values(status="done", done_at=bindparam("at"), lease_until=None, last_error=""))
_NEXT_OF_KEY = (select(OUTBOX.c.event_id).where(
    OUTBOX.c.ordering_key == bindparam("key"), OUTBOX.c.id > bindparam("pk"), OUTBOX.c.status == "pending",
    OUTBOX.c.next_attempt_at <= bindparam("now")).order_by(OUTBOX.c.id).limit(1))


class EventRunner:
    """Runs outbox events by event id with the handlers of their kinds."""

    def __init__(self, engine: Engine, handlers: Mapping[str, Handler], policy: RetryPolicy | None = None,
                 clock: Callable[[], datetime] = datetime.now, on_done: Callable[[], None] | None = None,
                 chain_limit: int = 20) -> None:
        self.engine = engine
        self.handlers = handlers
        self.policy = policy or RetryPolicy()
        self.clock = clock
        self.on_done = on_done
        self.chain_limit = chain_limit

    def run(self, event_id: str) -> str:
        """Run the event; returns what happened: done, already_done, busy, blocked, not_due, retry, failed,
        unknown (and, after done, runs the next events of the same key)."""
        result, event = self._run_one(event_id)
        chained = 0
        while result == "done" and event is not None and event.ordering_key and chained < self.chain_limit:
            successor = self._next_of_key(event)
            if successor is None:
                break
            chained += 1
            next_result, event = self._run_one(successor)
            if next_result != "done":
                break
        if result == "done" and self.on_done is not None:
            self.on_done()
        return result

    def _run_one(self, event_id: str) -> tuple[str, Event | None]:
        claimed = self._claim(event_id)
        if isinstance(claimed, str):
            log.debug("event.not_run", event_id=event_id, reason=claimed)
            return claimed, None
        handler = self.handlers.get(claimed.kind)
        try:
            if handler is None:
                raise LookupError(f"no handler for event kind {claimed.kind!r}")
            handler(claimed)
        except Exception as exc:
            return self._failed(claimed, exc), claimed
        with self.engine.begin() as db:
            db.execute(_DONE, {"pk": claimed.id, "at": self.clock()})
        log.info("event.done", event_id=claimed.event_id, kind=claimed.kind, attempts=claimed.attempts + 1)
        return "done", claimed

    def _claim(self, event_id: str) -> Event | str:
        now = self.clock()
        with self.engine.begin() as db:
            read = _CLAIM_READ_LOCKING if db.dialect.name == "postgresql" else _CLAIM_READ
            row = db.execute(read, {"event_id": event_id}).first()
            if row is None:
                return "unknown_or_busy"
            if row.status == "done":
                return "already_done"
            if row.status == "failed":
                return "failed"
            if row.status == "running" and row.lease_until is not None and row.lease_until > now:
                return "busy"
            if row.blocked:
                db.execute(_RELEASE_PENDING, {"pk": row.id})
                return "blocked"
            if row.status == "pending" and row.next_attempt_at > now:
                db.execute(_RELEASE, {"pk": row.id})
                return "not_due"
            if row.attempts >= self.policy.max_attempts:
                # every attempt was lost with its worker (its lease expired; the relay may have set the row
                # pending again to republish it): a failed attempt would have ended failed itself
                error = f"worker lost: lease expired on attempt {row.attempts}"
                db.execute(_FAIL_LOST, {"pk": row.id, "now": now, "error": error})
                log.error("event.failed", event_id=row.event_id, kind=row.kind, attempts=row.attempts, error=error)
                return "failed"
            taken = db.execute(_TAKE, {"pk": row.id, "now": now,
                                       "until": now + timedelta(seconds=self.policy.lease_seconds)}).rowcount
            if not taken:
                return "busy"
            # attempts as before this one (the handler and _failed count this one themselves)
            return Event(row.id, row.event_id, row.kind, row.payload, row.ordering_key, row.attempts)

    def _failed(self, event: Event, exc: Exception) -> str:
        attempts = event.attempts + 1
        error = f"{type(exc).__name__}: {exc}"[:2000]
        now = self.clock()
        if attempts >= self.policy.max_attempts:
            values: dict[str, Any] = {"status": "failed", "attempts": attempts, "last_error": error,
                                      "lease_until": None}
            outcome = "failed"
            log.error("event.failed", event_id=event.event_id, kind=event.kind, attempts=attempts, error=error)
        else:
            delay = backoff_delay(attempts, self.policy.backoff_base, self.policy.backoff_max)
            values = {"status": "pending", "attempts": attempts, "last_error": error, "lease_until": None,
                      "next_attempt_at": now + timedelta(seconds=delay)}
            outcome = "retry"
            log.warning("event.retry", event_id=event.event_id, kind=event.kind, attempts=attempts,
                        delay=delay, error=error)
        with self.engine.begin() as db:
            db.execute(update(OUTBOX).where(OUTBOX.c.id == event.id, OUTBOX.c.status == "running").values(values))
        return outcome

    def _next_of_key(self, event: Event) -> str | None:
        with self.engine.connect() as db:
            found = db.execute(_NEXT_OF_KEY, {"key": event.ordering_key, "pk": event.id,
                                              "now": self.clock()}).scalar_one_or_none()
        return str(found) if found is not None else None


def retry_failed(engine: Engine, ident: str, clock: Callable[[], datetime] = datetime.now) -> bool:
    """``broker events retry ID``: a failed event (by id or event id) becomes pending with attempts reset."""
    condition = OUTBOX.c.id == int(ident) if ident.isdigit() else OUTBOX.c.event_id == ident
    with engine.begin() as db:
        changed = db.execute(update(OUTBOX).where(condition, OUTBOX.c.status == "failed").values(
            status="pending", attempts=0, next_attempt_at=clock(), lease_until=None)).rowcount
    return bool(changed)
