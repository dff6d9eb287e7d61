"""Named leases in ``cluster_leases``: one holder at a time, for a bounded time, across processes and nodes.

A lease is taken, or renewed by its holder, with one atomic upsert (PostgreSQL and SQLite both:
``INSERT ... ON CONFLICT (name) DO UPDATE ... WHERE <expired or already mine> RETURNING``): of any
number of processes asking at once exactly one gets a row back. A holder that stops renewing (a dead
node) loses the lease once ``expires_at`` has passed, and the next one to ask takes it over.

The clock: on PostgreSQL every time in the statement is the database's (``now()`` in UTC), so nodes
whose clocks differ still agree on when a lease ends; on SQLite (one host by nature) the process's
UTC clock. Lease times are therefore UTC, unlike the broker's other (local) timestamps, and are only
ever compared with each other.

A lease does not fence: a holder stalled past its expiry (a long pause) may still act once before it
finds, at its next renewal, that another has taken over. What the broker guards with leases is
harmless to do twice (a sweep, a vacuum, a purge, an audit record sent again: delivery is at least
once); the holders renew well before the end (a third of the lease) to keep that rare.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, delete, func, literal, null, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from broker.store.tables import ClusterLease, table_of

LEASES = table_of(ClusterLease)


def utc_now() -> datetime:
    """The process's clock as the lease times are kept (UTC, no time zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


def database_now(db: Connection) -> Any:
    """SQL expression of "now" for lease times: PostgreSQL's clock in UTC, else this process's."""
    if db.dialect.name == "postgresql":
        return func.timezone("UTC", func.now())
    return literal(utc_now())


def _until(db: Connection, seconds: float) -> Any:
    if db.dialect.name == "postgresql":
        return func.timezone("UTC", func.now()) + func.make_interval(0, 0, 0, 0, 0, 0, seconds)
    return literal(utc_now() + timedelta(seconds=seconds))


def acquire_in(db: Connection, name: str, holder: str, seconds: float) -> bool:
    """:func:`try_acquire` inside the caller's transaction (the lease is the caller's once it commits)."""
    now, until = database_now(db), _until(db, seconds)
    dialect_insert = postgresql.insert if db.dialect.name == "postgresql" else sqlite.insert
    statement = dialect_insert(LEASES).values(name=name, holder=holder, acquired_at=now, expires_at=until,
                                              wanted_by=None)
    excluded = statement.excluded
    mine = LEASES.c.holder == excluded.holder
    upsert = statement.on_conflict_do_update(
        index_elements=[LEASES.c.name],
        set_={"holder": excluded.holder, "expires_at": excluded.expires_at,
              # renewed: held since it was first taken, the request to let go stays; taken over: anew
              "acquired_at": func.coalesce(_when(mine, LEASES.c.acquired_at), excluded.acquired_at),
              "wanted_by": _when(mine, LEASES.c.wanted_by)},
        where=or_(mine, LEASES.c.expires_at < excluded.acquired_at),
    ).returning(LEASES.c.holder)
    return db.execute(upsert).first() is not None


def _when(condition: Any, value: Any) -> Any:
    return case((condition, value), else_=null())


def try_acquire(engine: Engine, name: str, holder: str, seconds: float) -> bool:
    """Take the lease ``name`` for ``seconds`` if it is free, expired or already ``holder``'s (then it is
    renewed); returns whether ``holder`` holds it now. One statement, one transaction."""
    with engine.begin() as db:
        return acquire_in(db, name, holder, seconds)


def renew_all(engine: Engine, holder: str, names: list[str], seconds: float) -> set[str]:
    """Extend every lease of ``names`` that ``holder`` still holds; returns those it holds (the others
    were taken over after they expired)."""
    if not names:
        return set()
    with engine.begin() as db:
        rows = db.execute(update(LEASES).where(LEASES.c.name.in_(names), LEASES.c.holder == holder)
                          .values(expires_at=_until(db, seconds)).returning(LEASES.c.name))
        return {row.name for row in rows}


def release(engine: Engine, name: str, holder: str) -> bool:
    """Give the lease up (if ``holder`` holds it): the next one asking takes it at once."""
    with engine.begin() as db:
        return bool(db.execute(delete(LEASES).where(LEASES.c.name == name, LEASES.c.holder == holder)).rowcount)


def want(engine: Engine, name: str, holder: str) -> None:
    """Ask the live holder of ``name`` to let go of it for ``holder`` (see :mod:`broker.cluster.handoff`)."""
    with engine.begin() as db:
        db.execute(update(LEASES).where(LEASES.c.name == name, LEASES.c.holder != holder,
                                        or_(LEASES.c.wanted_by.is_(None), LEASES.c.wanted_by != holder))
                   .values(wanted_by=holder))


def wanted_of(engine: Engine, holder: str) -> set[str]:
    """The leases ``holder`` holds that another holder asked for."""
    with engine.connect() as db:
        return set(db.execute(select(LEASES.c.name).where(LEASES.c.holder == holder,
                                                          LEASES.c.wanted_by.is_not(None))).scalars())


def holder_of(engine: Engine, name: str) -> str | None:
    """Who holds ``name`` now (``None``: nobody, or the lease has expired)."""
    with engine.connect() as db:
        return db.execute(select(LEASES.c.holder).where(
            and_(LEASES.c.name == name, LEASES.c.expires_at >= database_now(db)))).scalar()
