"""Hot-path statements compiled once per dialect and run straight on the driver's connection.

The HL7 intake runs a handful of fixed statements per message. Through ``Connection.execute`` each
one costs SQLAlchemy 40-110 us of CPU on this hardware (cache-key lookup, parameter construction,
execution context, result wrapper), against 17-35 us for the same statement on ``sqlite3`` itself:
together about a third of an order's CPU (measured with py-spy and callgrind, bench/hl7_profile.py).

A :class:`Prepared` keeps a SQLAlchemy Core statement (tables, types and dialect differences stay
SQLAlchemy's) and compiles it once per dialect and set of parameter names into what the driver
needs: the SQL text, the parameter order, the types' bind processors (JSON, SQLite's DATETIME) and
result processors, and a row class. Executing it is then one driver call inside the caller's
transaction, on the same DBAPI connection as the SQLAlchemy :class:`~sqlalchemy.engine.Connection`
it is given, so prepared and ordinary statements mix freely in one transaction.

What stays as SQLAlchemy would do it:

* Driver errors are raised as SQLAlchemy's wrappers (``IntegrityError``, ``OperationalError``), and
  a lost connection invalidates the Connection, as ``Connection.execute`` does.
* Columns left out of an INSERT or UPDATE get their scalar Python defaults.
* Anything this does not handle (callable column defaults, expanding IN parameters, a statement
  that cannot be compiled ahead) runs through ``Connection.execute`` instead, so the answer is
  the same, only slower.

Rows are named tuples: attribute access as on SQLAlchemy's ``Row``.

On PostgreSQL each statement is prepared on the server at its first execution (psycopg
``prepare=True``), also where the engine prepares nothing else (``make_engine(plan_each_execution=True)``,
the HL7 intake's): parsing and planning once saves the server about 0.5 ms of CPU per HL7 order. A
prepared statement soon runs a generic plan, made for no particular values and possibly while the
tables were empty, so a statement made a :class:`Prepared` must be one whose every plan uses an index:
equality on indexed columns, no OR between indexes, no ORDER BY ... LIMIT that a plan could answer by
walking another index (tests/integration/test_hl7_order_statements.py reads the table statistics).
"""

from __future__ import annotations

import weakref
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.expression import Executable

Processor = Callable[[Any], Any]


@dataclass(frozen=True)
class _Form:
    """A statement compiled for one dialect and one set of parameter names."""

    sql: str
    names: tuple[str, ...]  # parameter names in the order the SQL text takes them
    positional: bool  # qmark/numeric (a tuple) or named (a dict)
    fixed: dict[str, Any]  # values the caller does not give: literals, column defaults
    binders: tuple[tuple[str, Processor], ...]  # (name, bind processor) of the parameters that have one
    row: Any  # the row class (a named tuple), or None for a statement that returns no rows
    readers: tuple[tuple[int, Processor], ...]  # (column index, result processor)
    prepare: bool  # psycopg: prepared on the server at its first execution (see make_engine)


_FALLBACK = object()  # marks a statement/parameter-names pair that runs through Connection.execute


class Prepared:
    """One hot-path statement; see the module docstring. Build it once, at import time."""

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._forms: weakref.WeakKeyDictionary[Dialect, dict[tuple[str, ...], _Form | object]] = (
            weakref.WeakKeyDictionary())

    # --- results, as the callers need them ----------------------------------------------------------
    def first(self, db: Connection, params: Mapping[str, Any]) -> Any | None:
        """The first row, or None."""
        form, cursor = self._execute(db, params)
        if form is None:
            return cursor.first()
        found = cursor.fetchone()
        cursor.close()
        return None if found is None else _row(form, found)

    def one(self, db: Connection, params: Mapping[str, Any]) -> Any:
        """The one row; raises like ``Result.one()`` when there is none."""
        row = self.first(db, params)
        if row is None:
            from sqlalchemy.exc import NoResultFound

            raise NoResultFound("No row was found when one was required")
        return row

    def all(self, db: Connection, params: Mapping[str, Any]) -> list[Any]:
        """Every row."""
        form, cursor = self._execute(db, params)
        if form is None:
            return list(cursor)
        rows = [_row(form, found) for found in cursor.fetchall()]
        cursor.close()
        return rows

    def scalar(self, db: Connection, params: Mapping[str, Any]) -> Any | None:
        """The first column of the first row, or None."""
        row = self.first(db, params)
        return None if row is None else row[0]

    def rowcount(self, db: Connection, params: Mapping[str, Any]) -> int:
        """Rows changed by an UPDATE or DELETE."""
        return int(self._written(db, params, "rowcount"))

    def lastrowid(self, db: Connection, params: Mapping[str, Any]) -> int:
        """The key of the row an INSERT made (SQLite: the rowid, which is every table's key here)."""
        return int(self._written(db, params, "lastrowid"))

    def _written(self, db: Connection, params: Mapping[str, Any], attribute: str) -> Any:
        """Run a statement whose rows nobody reads; the cursor's ``attribute`` after it."""
        form, cursor = self._execute(db, params)
        value = getattr(cursor, attribute)
        if form is not None:
            cursor.close()
        return value

    # --- execution ----------------------------------------------------------------------------------
    def _execute(self, db: Connection, params: Mapping[str, Any]) -> tuple[_Form | None, Any]:
        """Run the statement; (its form and the driver's cursor), or (None, a CursorResult)."""
        dialect = db.dialect
        forms = self._forms.get(dialect)
        if forms is None:
            forms = self._forms[dialect] = {}
        key = tuple(params)
        form = forms.get(key)
        if form is None:
            form = forms[key] = _compile(self.statement, dialect, key)
        if form is _FALLBACK:
            return None, db.execute(self.statement, params)
        assert isinstance(form, _Form)
        values = _bind(form, params)
        driver = db.connection.dbapi_connection
        assert driver is not None
        try:
            if form.prepare:
                return form, driver.execute(form.sql, values, prepare=True)
            return form, driver.execute(form.sql, values)
        except dialect.loaded_dbapi.Error as exc:
            invalidated = dialect.is_disconnect(exc, driver, None)
            if invalidated:
                db.invalidate(exc)
            raise DBAPIError.instance(form.sql, values, exc, dialect.loaded_dbapi.Error,
                                      connection_invalidated=invalidated, dialect=dialect) from exc


def _bind(form: _Form, params: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
    """The driver's parameters: the caller's and the fixed ones, through the types' bind processors."""
    values = {**form.fixed, **params} if form.fixed else dict(params)
    for name, process in form.binders:  # as SQLAlchemy does, None too (JSON keeps None as 'null')
        values[name] = process(values[name])
    if form.positional:
        return tuple([values[name] for name in form.names])
    return values


def _row(form: _Form, found: Sequence[Any]) -> Any:
    if form.readers:
        found = list(found)
        for index, process in form.readers:
            found[index] = process(found[index])
    return form.row._make(found)


def _row_class(labels: list[str]) -> Any:
    """A named tuple class for rows of these columns: attribute access, as on SQLAlchemy's Row."""
    return namedtuple("Row", labels)  # the names are known only at run time


def _compile(statement: Executable, dialect: Dialect, names: tuple[str, ...]) -> _Form | object:
    """Compile ``statement`` for ``dialect`` and the parameter ``names`` a caller gives, or mark it
    for Connection.execute when it needs more than this module does."""
    compiled: Any = cast(Any, statement).compile(dialect=dialect, column_keys=list(names))
    if compiled.literal_execute_params or compiled.post_compile_params:
        return _FALLBACK
    fixed: dict[str, Any] = {}
    for column in [*compiled.insert_prefetch, *compiled.update_prefetch]:
        default = column.onupdate if column in compiled.update_prefetch else column.default
        if default is None or not default.is_scalar:
            return _FALLBACK
        fixed[column.key] = default.arg
    binders: list[tuple[str, Processor]] = []
    order: list[str] = []
    for bind, name in compiled.bind_names.items():
        if not isinstance(bind, BindParameter) or bind.expanding or bind.isoutparam:
            return _FALLBACK
        if name in order:  # one parameter used twice in the statement
            continue
        order.append(name)
        if name not in names and name not in fixed:
            if bind.callable is not None:
                return _FALLBACK
            if bind.required and bind.value is None:
                return _FALLBACK  # SQLAlchemy raises its own error for a missing parameter
            fixed[name] = bind.value
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            binders.append((name, process))
    positional = bool(compiled.positional)
    sql = compiled.string
    row: Any = None
    readers: tuple[tuple[int, Processor], ...] = ()
    if getattr(statement, "is_select", False) or compiled.returning:
        columns = getattr(statement, "exported_columns", None)
        if not columns:
            return _FALLBACK
        labels = [column.key for column in columns]
        if len(set(labels)) != len(labels) or not all(label.isidentifier() for label in labels):
            return _FALLBACK
        row = _row_class(labels)
        readers = tuple((index, process) for index, column in enumerate(columns)
                        if (process := column.type.dialect_impl(dialect).result_processor(dialect, None)))
    return _Form(sql=sql, names=tuple(compiled.positiontup) if positional else tuple(order),
                 positional=positional, fixed=fixed, binders=tuple(binders), row=row, readers=readers,
                 prepare=dialect.driver == "psycopg")
