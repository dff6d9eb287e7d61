"""``run_event``: perform one outbox event at least once, idempotently by its event id.

The same function runs in a Celery worker (Redis) and in the broker's in-process worker threads.
A task may be delivered twice (acks late, redelivery after a lost worker, the relay publishing again
after a lease expired): the claim makes only one run at a time, and a done event is never run again.

1. Claim in a short transaction (one for a task's whole batch of events): status running,
   ``lease_until = now + event_lease_seconds``, attempts + 1 (an attempt counts when it starts, so a
   worker that dies mid-task, e.g. killed on the same poison event every time, still uses up the
   attempts). On PostgreSQL the rows are read ``FOR UPDATE SKIP LOCKED`` (a concurrent claimer skips
   them at once); the UPDATE is conditional on each row still being claimable (pending, or running
   with an expired lease) and the rows it returns decide, which is what makes it safe on SQLite too.
   A running row whose lease expired after its last allowed attempt is not run again: it becomes failed.
2. Ordering: while an earlier event with the same ``ordering_key`` is not done, the event stays
   pending (the relay publishes only the head of each key, so it comes back when its turn comes).
3. Run the handler for its kind outside any transaction (it talks to the network).
4. Done (one transaction for the batch's successful events); or a retry after
   ``min(event_backoff_max, event_backoff_base * 2**(attempts-1))`` seconds; after
   ``event_max_attempts`` the event is failed (``broker events failed`` shows it).
5. A done event runs the next pending event of its key at once, so an order's status messages do
   not wait for a poll between them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, and_, bindparam, exists, func, or_, select, text, update

from broker.outbox.outbox import CONSUMED_KINDS, OUTBOX
from broker.store.tables import OutboxEvent, table_of

log = structlog.get_logger(__name__)

_EARLIER = table_of(OutboxEvent).alias("earlier")
# Handlers get the event; they raise to ask for a retry.
Handler = Callable[["Event"], None]
# A batch handler gets the claimed events of its kind in a task (in id order, at most one per ordering
# key) and answers those it did not perform, with why: each of them is retried.
BatchHandler = Callable[[list["Event"]], dict[int, Exception]]


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


# "not done" as the partial index ix_outbox_open states it: with the literal (not a bound parameter) the
# planner knows the index covers the condition.
NOT_DONE = text("status != 'done'")
_EARLIER_NOT_DONE = text("earlier.status != 'done'")


def blocked_by_earlier() -> Any:
    """SQL condition: an earlier event with the same (non-empty) ordering key is not done yet."""
    return exists().where(_EARLIER.c.ordering_key == OUTBOX.c.ordering_key, OUTBOX.c.ordering_key != "",
                          _EARLIER.c.id < OUTBOX.c.id, _EARLIER_NOT_DONE)


def key_heads() -> Any:
    """SQL condition: the event is the first not done of its key, or has no key (it may run now)."""
    heads = (select(func.min(OUTBOX.c.id)).where(OUTBOX.c.ordering_key != "", NOT_DONE)
             .group_by(OUTBOX.c.ordering_key).correlate(None))
    return or_(OUTBOX.c.ordering_key == "", OUTBOX.c.id.in_(heads))


# The runner's statements, built once: building a statement and its cache key cost more CPU than
# running it (a third of the worker's Python time per event, measured with py-spy).
_CLAIM_READ = (select(OUTBOX, blocked_by_earlier().label("blocked"))
               .where(OUTBOX.c.event_id.in_(bindparam("event_ids", expanding=True))))
_CLAIM_READ_LOCKING = _CLAIM_READ.with_for_update(skip_locked=True, of=OUTBOX)
_CLAIMABLE = or_(OUTBOX.c.status == "pending",
                 and_(OUTBOX.c.status == "running", OUTBOX.c.lease_until < bindparam("now")))
_RELEASE_PENDING = (update(OUTBOX).where(OUTBOX.c.id == bindparam("pk"), OUTBOX.c.status == "pending")
                    .values(lease_until=None))
_RELEASE = update(OUTBOX).where(OUTBOX.c.id == bindparam("pk")).values(lease_until=None)
_FAIL_LOST = (update(OUTBOX).where(OUTBOX.c.id == bindparam("pk"), _CLAIMABLE)
              .values(status="failed", lease_until=None, last_error=bindparam("error")))
_TAKE_MANY = (update(OUTBOX).where(OUTBOX.c.id.in_(bindparam("pks", expanding=True)), _CLAIMABLE)
              .values(status="running", attempts=OUTBOX.c.attempts + 1, lease_until=bindparam("until"))
              .returning(OUTBOX.c.id))
_DONE_MANY = (update(OUTBOX).where(OUTBOX.c.id.in_(bindparam("pks", expanding=True)), OUTBOX.c.status != "done")
              .values(status="done", done_at=bindparam("at"), lease_until=None, last_error=""))
# The first pending event of each key (the earlier ones of a key just ran, so it is the key's head).
# Rows of the consumed kinds (broker.outbox.consumer) are never run here.
_HEADS_OF_KEYS = (select(func.min(OUTBOX.c.id)).where(
    OUTBOX.c.ordering_key.in_(bindparam("keys", expanding=True)), OUTBOX.c.status == "pending",
    OUTBOX.c.next_attempt_at <= bindparam("now"), OUTBOX.c.kind.not_in(sorted(CONSUMED_KINDS)))
    .group_by(OUTBOX.c.ordering_key))
_NEXT_OF_KEYS = select(OUTBOX.c.event_id).where(OUTBOX.c.id.in_(_HEADS_OF_KEYS)).order_by(OUTBOX.c.id)


class EventRunner:
    """Runs outbox events by event id with the handlers of their kinds."""

    def __init__(self, engine: Engine, handlers: Mapping[str, Handler], policy: RetryPolicy | None = None,
                 clock: Callable[[], datetime] = datetime.now, on_done: Callable[[], None] | None = None,
                 chain_limit: int = 20, batch_handlers: Mapping[str, BatchHandler] | None = None) -> None:
        self.engine = engine
        self.handlers = handlers
        self.batch_handlers = batch_handlers or {}
        self.policy = policy or RetryPolicy()
        self.clock = clock
        self.on_done = on_done
        self.chain_limit = chain_limit

    def run(self, event_id: str) -> str:
        """Run the event; returns what happened: done, already_done, busy, blocked, not_due, retry, failed,
        unknown (and, after done, runs the next events of the same key)."""
        return self.run_many([event_id])[0]

    def run_many(self, event_ids: list[str]) -> list[str]:
        """Run the events (a task's batch), returning what happened to each, in the order given.

        The batch shares its bookkeeping: one transaction claims every event of it, the handlers run
        one after the other in ``id`` order, and one transaction marks the successful ones done. Per
        event, the claim and the done mark were two transactions and four statements, most of the
        worker's cost for a cheap handler such as a UPS event report (100 subscribers x each change).
        A done event's key then runs its next pending event at once (up to ``chain_limit`` rounds), so
        an order's status messages do not wait for a relay poll between them.
        """
        unique = list(dict.fromkeys(event_ids))
        outcomes = self._run_round(unique)
        done = [event for event in outcomes.values() if isinstance(event, Event)]
        rounds = 0
        while done and rounds < self.chain_limit:
            successors = self._next_of_keys(done)
            if not successors:
                break
            rounds += 1
            done = [event for event in self._run_round(successors).values() if isinstance(event, Event)]
        results = {event_id: "done" if isinstance(outcome, Event) else outcome
                   for event_id, outcome in outcomes.items()}
        if self.on_done is not None and "done" in results.values():
            self.on_done()
        return [results[event_id] for event_id in event_ids]

    def _run_round(self, event_ids: list[str]) -> dict[str, Event | str]:
        """Claim, run and mark ``event_ids``: each maps to its done :class:`Event` or why it did not run."""
        outcomes: dict[str, Event | str] = dict(self._claim_many(event_ids))
        claimed = sorted((o for o in outcomes.values() if isinstance(o, Event)), key=lambda e: e.id)
        failures: dict[int, Exception] = {}
        for kind, batch_handler in self.batch_handlers.items():
            batch = [event for event in claimed if event.kind == kind]
            if batch:
                try:
                    failures.update(batch_handler(batch))
                except Exception as exc:
                    failures.update((event.id, exc) for event in batch)
        done: list[Event] = []
        for event in claimed:
            if event.kind not in self.batch_handlers:
                handler = self.handlers.get(event.kind)
                try:
                    if handler is None:
                        raise LookupError(f"no handler for event kind {event.kind!r}")
                    handler(event)
                except Exception as exc:
                    failures[event.id] = exc
            if event.id in failures:
                outcomes[event.event_id] = self._failed(event, failures[event.id])
            else:
                done.append(event)
        if done:
            with self.engine.begin() as db:
                db.execute(_DONE_MANY, {"pks": [event.id for event in done], "at": self.clock()})
            for event in done:
                log.info("event.done", event_id=event.event_id, kind=event.kind, attempts=event.attempts + 1)
        return outcomes

    def _claim_many(self, event_ids: list[str]) -> dict[str, Event | str]:
        """One transaction: each event is claimed (an :class:`Event`) or left, with the reason."""
        now = self.clock()
        outcomes: dict[str, Event | str] = {}
        with self.engine.begin() as db:
            read = _CLAIM_READ_LOCKING if db.dialect.name == "postgresql" else _CLAIM_READ
            rows = {row.event_id: row for row in db.execute(read, {"event_ids": event_ids})}
            claimable = []
            for event_id in event_ids:
                reason = self._why_not(db, rows.get(event_id), now)
                if reason:
                    outcomes[event_id] = reason
                    log.debug("event.not_run", event_id=event_id, reason=reason)
                else:
                    claimable.append(rows[event_id])
            if claimable:
                until = now + timedelta(seconds=self.policy.lease_seconds)
                taken = set(db.execute(_TAKE_MANY, {"pks": [row.id for row in claimable], "now": now,
                                                    "until": until}).scalars())
                for row in claimable:
                    # attempts as before this one (the handler and _failed count this one themselves)
                    outcomes[row.event_id] = (Event(row.id, row.event_id, row.kind, row.payload, row.ordering_key,
                                                    row.attempts) if row.id in taken else "busy")
        return outcomes

    def _why_not(self, db: Connection, row: Any, now: datetime) -> str:
        """Why the event of ``row`` cannot be claimed now ('' = it can); releases it where it waits."""
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
        return ""

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

    def _next_of_keys(self, done: list[Event]) -> list[str]:
        """The next due pending event of each ordering key in ``done`` (one statement for the batch)."""
        keys = sorted({event.ordering_key for event in done if event.ordering_key})
        if not keys:
            return []
        with self.engine.connect() as db:
            return [str(event_id) for event_id in db.execute(_NEXT_OF_KEYS, {"keys": keys, "now": self.clock()})
                    .scalars()]


def retry_failed(engine: Engine, ident: str, clock: Callable[[], datetime] = datetime.now) -> bool:
    """``broker events retry ID``: a failed event (by id or event id) becomes pending with attempts reset."""
    condition = OUTBOX.c.id == int(ident) if ident.isdigit() else OUTBOX.c.event_id == ident
    with engine.begin() as db:
        changed = db.execute(update(OUTBOX).where(condition, OUTBOX.c.status == "failed").values(
            status="pending", attempts=0, next_attempt_at=clock(), lease_until=None)).rowcount
    return bool(changed)
