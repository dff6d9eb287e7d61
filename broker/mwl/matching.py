"""A :class:`~broker.mwl.identifier.WorklistQuery` as SQL on ``scheduled_steps``: one SELECT, read in pages.

Every condition is a SQL condition on a column that ``worklist_item.index_columns`` fills from the
item, so nothing is filtered in Python and the item JSON is only read for rows that match.

- Single value: ``=`` (case-sensitive on both databases). PN keys with an upper-cased copy
  (Patient's Name, Scheduled Performing Physician's Name) match that copy when ``pn_case_insensitive``
  is on; when it is off they match exactly, and the upper-cased (indexed) copy is still used to narrow.
- Wildcard: PostgreSQL ``LIKE ... ESCAPE '\\'`` with ``%``, ``_`` and ``\\`` escaped; SQLite ``GLOB`` with
  ``[`` escaped, because SQLite's ``LIKE`` ignores ASCII case and a worklist key is case-sensitive.
- A stored empty value never matches a non-universal key: ``=`` and wildcards cannot match '' (a value
  of only ``*`` is universal and has no condition), ranges exclude '' and NULL explicitly.
- UID list: ``IN``.
- Hidden statuses: ``sps_status NOT IN (...)`` unless the query has its own SPS Status key, which then
  decides alone: a modality that asks for CANCELED steps gets exactly those; no key or a universal one
  keeps them hidden.
- ``station_ae_title``: only that station's items are visible (the "station sees only its own items"
  option; the edge sets it per association from the calling AE title).

Paging is keyset on ``(scheduled_start, id)``: items with a start are read in start order, then those
without one (NULL) by id, each page one short statement of at most ``page_size`` rows. Two statements
rather than one ``NULLS LAST`` order keep both phases on an index on both databases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, Text, and_, cast, func, or_, select, true, tuple_

from broker.domain.states import StepStatus
from broker.mwl.identifier import (
    AnyOf,
    Condition,
    DateRange,
    SingleValue,
    StartRange,
    TimeOfDayRange,
    UidList,
    Wildcard,
    WorklistQuery,
)
from broker.store.tables import ScheduledStep, table_of

__all__ = [
    "DEFAULT_HIDDEN_STATUSES",
    "PageKey",
    "WorklistOptions",
    "match_conditions",
    "may_have_undated",
    "normalise_pn",
    "page_select",
    "worklist_select",
]

STEPS = table_of(ScheduledStep)
DEFAULT_HIDDEN_STATUSES: frozenset[str] = frozenset(
    {StepStatus.STARTED, StepStatus.COMPLETED, StepStatus.CANCELED, StepStatus.DISCONTINUED})
_LIKE_ESCAPE = "\\"


@dataclass(frozen=True)
class WorklistOptions:
    """How the worklist answers; the same for every query of a running broker (except the station).

    ``pn_case_insensitive``: PN single values and wildcards ignore case (PS3.4 C.2.2.2.1 allows it for PN).
    ``hidden_statuses``: SPS statuses not returned unless the query asks for an SPS Status itself.
    ``page_size``: rows per database read; a larger page costs memory, a smaller one round trips.
    ``station_ae_title``: when set, only items scheduled on that station are visible.
    """

    pn_case_insensitive: bool = True
    hidden_statuses: frozenset[str] = field(default=DEFAULT_HIDDEN_STATUSES)
    page_size: int = 500
    station_ae_title: str | None = None

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError("page_size must be at least 1")


@dataclass(frozen=True)
class PageKey:
    """Where the previous page ended: the last row's ``scheduled_start`` (None: the undated phase) and id."""

    scheduled_start: datetime | None
    id: int


def normalise_pn(value: str) -> str:
    """The upper-cased form ``index_columns`` stores in ``*_norm`` (``str.upper``: Unicode-aware, unlike
    SQL ``upper()`` on SQLite), so a query value is compared with exactly what was stored."""
    return value.upper()


def match_conditions(query: WorklistQuery, options: WorklistOptions, dialect_name: str) -> list[ColumnElement[bool]]:
    """The WHERE clause of ``query``: its conditions, the hidden statuses and the station restriction."""
    sqlite = dialect_name == "sqlite"
    where = [_condition(c, options, sqlite) for c in query.conditions]
    status = query.matches_on("ScheduledProcedureStepStatus")
    if options.hidden_statuses and not status:
        where.append(STEPS.c.sps_status.not_in(sorted(options.hidden_statuses)))
    if options.station_ae_title is not None:
        where.append(STEPS.c.scheduled_station_ae_title == options.station_ae_title)
    return where


def worklist_select(query: WorklistQuery, options: WorklistOptions, dialect_name: str) -> Select[Any]:
    """The whole match as one SELECT (id, scheduled_start, item), in answer order; unpaged.

    For inspection (EXPLAIN, tests); :class:`~broker.mwl.finder.WorklistFinder` reads it through
    :func:`page_select` instead.
    """
    where = match_conditions(query, options, dialect_name)
    return (select(STEPS.c.id, STEPS.c.scheduled_start, STEPS.c.item).where(*where)
            .order_by(STEPS.c.scheduled_start.is_(None), STEPS.c.scheduled_start, STEPS.c.id))


def page_select(where: Sequence[ColumnElement[bool]], after: PageKey | None, limit: int,
                dated: bool = True) -> Select[Any]:
    """One page of the match: rows after ``after`` in the dated phase (``scheduled_start`` set, ordered by
    start then id) or the undated phase (no start, ordered by id)."""
    # The item as its JSON text, parsed one row at a time by the finder: a page of 500 parsed items held
    # by each of 50 concurrent broad queries was most of the broker's peak memory.
    columns = select(STEPS.c.id, STEPS.c.scheduled_start, cast(STEPS.c.item, Text).label("item")).where(*where)
    if dated:
        statement = columns.where(STEPS.c.scheduled_start.is_not(None))
        if after is not None and after.scheduled_start is not None:
            statement = statement.where(tuple_(STEPS.c.scheduled_start, STEPS.c.id)
                                        > tuple_(after.scheduled_start, after.id))
        return statement.order_by(STEPS.c.scheduled_start, STEPS.c.id).limit(limit)
    statement = columns.where(STEPS.c.scheduled_start.is_(None))
    if after is not None and after.scheduled_start is None:
        statement = statement.where(STEPS.c.id > after.id)
    return statement.order_by(STEPS.c.id).limit(limit)


def may_have_undated(query: WorklistQuery) -> bool:
    """Whether items without a start date can match (no SPS Start Date condition)."""
    return not any(isinstance(c, StartRange) for c in query.conditions)


# --- one condition -----------------------------------------------------------------------------------
def _condition(condition: Condition, options: WorklistOptions, sqlite: bool) -> ColumnElement[bool]:
    if isinstance(condition, StartRange):
        return _start_range(condition)
    if isinstance(condition, TimeOfDayRange):
        return _time_of_day(condition)
    if isinstance(condition, DateRange):
        column = STEPS.c[condition.key.column]
        bounds: list[ColumnElement[bool]] = [column != ""]
        if condition.low is not None:
            bounds.append(column >= condition.low)
        if condition.high is not None:
            bounds.append(column <= condition.high)
        return and_(*bounds)
    if isinstance(condition, UidList):
        return STEPS.c[condition.key.column].in_(condition.uids)
    if isinstance(condition, AnyOf):
        return or_(*(_text(a, options, sqlite) for a in condition.alternatives))
    return _text(condition, options, sqlite)


def _start_range(condition: StartRange) -> ColumnElement[bool]:
    column = STEPS.c.scheduled_start
    bounds: list[ColumnElement[bool]] = [column.is_not(None)]
    if condition.low is not None:
        bounds.append(column >= condition.low)
    if condition.high is not None:
        bounds.append(column < condition.high)
    return and_(*bounds)


def _time_of_day(condition: TimeOfDayRange) -> ColumnElement[bool]:
    stored = STEPS.c.sps_start_time
    # HHMMSS of the stored TM ("0930" is read as 093000; fractions are dropped): both databases
    # compare these strings in time order.
    hhmmss = func.substr(stored.concat("000000"), 1, 6)
    low = hhmmss >= condition.low if condition.low is not None else None
    high = hhmmss <= condition.high if condition.high is not None else None
    if low is not None and high is not None:
        window = or_(low, high) if condition.crosses_midnight else and_(low, high)
    else:
        window = low if low is not None else high if high is not None else true()
    return and_(stored != "", window)


def _text(condition: SingleValue | Wildcard, options: WorklistOptions, sqlite: bool) -> ColumnElement[bool]:
    key = condition.key
    column = STEPS.c[key.column]
    folded = key.norm_column is not None and options.pn_case_insensitive
    if isinstance(condition, SingleValue):
        if key.norm_column is None:
            return column == condition.value
        norm_equal = STEPS.c[key.norm_column] == normalise_pn(condition.value)
        # Exact: the indexed upper-cased copy narrows, the original decides.
        return norm_equal if folded else and_(norm_equal, column == condition.value)
    if key.norm_column is None:
        return _wildcard(column, condition.pattern, sqlite)
    norm = STEPS.c[key.norm_column]
    if folded:
        return _wildcard(norm, normalise_pn(condition.pattern), sqlite)
    exact = _wildcard(column, condition.pattern, sqlite)
    prefix = _literal_prefix(condition.pattern)
    if not prefix:
        return exact
    # The value's literal prefix, upper-cased, is a prefix of the upper-cased copy: lets the index narrow.
    return and_(_wildcard(norm, normalise_pn(prefix) + "*", sqlite), exact)


def _literal_prefix(pattern: str) -> str:
    for position, char in enumerate(pattern):
        if char in "*?":
            return pattern[:position]
    return pattern


def _wildcard(column: Any, pattern: str, sqlite: bool) -> ColumnElement[bool]:
    """DICOM ``*``/``?`` matching, case-sensitive on both databases; other characters are literal."""
    if sqlite:
        # GLOB's own specials are * ? [ ; only [ needs escaping ([[] matches a literal '[').
        matched: ColumnElement[bool] = column.bool_op("GLOB")(pattern.replace("[", "[[]"))
        return matched
    return column.like(_like_pattern(pattern), escape=_LIKE_ESCAPE)


def _like_pattern(pattern: str) -> str:
    out = []
    for char in pattern:
        if char in ("%", "_", _LIKE_ESCAPE):
            out.append(_LIKE_ESCAPE + char)
        elif char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        else:
            out.append(char)
    return "".join(out)
