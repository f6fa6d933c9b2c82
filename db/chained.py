"""Rows for several tables in as few INSERT statements as the backend allows.

On PostgreSQL (`one_statement_writes`), one statement of data-modifying CTEs:
`WITH w0 AS (INSERT INTO a ...), w1 AS (INSERT INTO b ...) INSERT INTO c ...` is one round trip and
atomic on its own. On SQLite, one multi-row INSERT per table, in the caller's transaction. Each
statement is built once per shape (tables, row counts, columns) with named bind parameters and
kept, and runs from SQL compiled once (`db.precompiled`), where `insert().values(rows)` built anew
per call is compiled anew per call too (its cost in a profile: docs/performance.md, "What was
removed").

A row's value may be `DB_NOW` or `DbLater(seconds)`: the column then takes the database's time
(`db.clock`), now or that many seconds on (the seconds go in as a parameter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import Insert, Table, bindparam, insert

from db import clock, precompiled
from db.backend import backend_of
from db.driver import Statements


class _DbNow:
    def __repr__(self) -> str:
        return "DB_NOW"


DB_NOW: Any = _DbNow()


@dataclass(frozen=True)
class DbLater:
    """The database's time `seconds` from now, as a row value."""

    seconds: float


Rows = Sequence[Mapping[str, Any]]
# (table, row count, (column name, how its value is written)) per table, in insert order: "bind"
# (a parameter), "now" (`db.clock.now`), "later" (`db.clock.later`, the seconds a parameter).
_Shape = tuple[tuple[Table, int, tuple[tuple[str, str], ...]], ...]


def _kind(value: Any) -> str:
    if value is DB_NOW:
        return "now"
    return "later" if isinstance(value, DbLater) else "bind"


def insert_together(
    connection: Statements, parts: Sequence[tuple[Table, Rows]], returning: bool = False
) -> list[int]:
    """Insert every part's rows, in order: in one statement on PostgreSQL, one per part on SQLite;
    parts without rows are skipped. With `returning`, the primary key of the last row of the last
    part (one row is what needs it)."""
    keys: list[int] = []
    for statement, parameters, returns in statements_for(connection.dialect.name, parts, returning):
        result = precompiled.execute(connection, statement, parameters, prepare=True)
        if returns:
            keys = [int(key) for key in result.scalars()][-1:]
    return keys


def statements_for(
    dialect: str, parts: Sequence[tuple[Table, Rows]], returning: bool = False
) -> list[tuple[Insert, dict[str, Any], bool]]:
    """What `insert_together` runs, in order: (statement, parameters, whether it returns the key)."""
    if backend_of(dialect).one_statement_writes:
        prepared = statement_for(parts, returning)
        return [] if prepared is None else [(*prepared, returning)]
    # A statement writes one table: a multi-row INSERT per part. Row values are parameters only
    # (on SQLite the times are the process's, see `db.clock`).
    parts = [(table, rows) for table, rows in parts if rows]
    statements = []
    for index, (table, rows) in enumerate(parts):
        if any(_kind(value) != "bind" for row in rows for value in row.values()):
            raise ValueError("the database's clock is written by one-statement backends only")
        last = returning and index == len(parts) - 1
        parameters = {f"p{r}_{column}": value for r, row in enumerate(rows) for column, value in row.items()}
        statements.append((_rows_statement(table, len(rows), tuple(rows[0]), last), parameters, last))
    return statements


@lru_cache(maxsize=128)
def _rows_statement(table: Table, count: int, columns: tuple[str, ...], returning: bool) -> Insert:
    statement = insert(table).values(
        [
            {column: bindparam(f"p{r}_{column}", type_=table.c[column].type) for column in columns}
            for r in range(count)
        ]
    )
    return statement.returning(*table.primary_key.columns) if returning else statement


def statement_for(
    parts: Sequence[tuple[Table, Rows]], returning: bool = False
) -> tuple[Insert, dict[str, Any]] | None:
    """The statement (built once per shape) and parameters of `insert_together`; None if no rows."""
    parts = [(table, rows) for table, rows in parts if rows]
    if not parts:
        return None
    shape = tuple(
        (table, len(rows), tuple((column, _kind(value)) for column, value in rows[0].items()))
        for table, rows in parts
    )
    parameters = {
        _name(t, r, column): value.seconds if isinstance(value, DbLater) else value
        for t, (_table, rows) in enumerate(parts)
        for r, row in enumerate(rows)
        for column, value in row.items()
        if value is not DB_NOW
    }
    return _statement(shape, returning), parameters


def _name(table: int, row: int, column: str) -> str:
    return f"p{table}_{row}_{column}"


@lru_cache(maxsize=128)
def _statement(shape: _Shape, returning: bool) -> Insert:
    # One single-row INSERT per row: SQLAlchemy does not cache a multi-row VALUES statement.
    inserts = [
        insert(table).values({column: _value(table, t, r, column, kind) for column, kind in columns})
        for t, (table, count, columns) in enumerate(shape)
        for r in range(count)
    ]
    *riders, last = inserts
    if returning:
        last = last.returning(*shape[-1][0].primary_key.columns)
    return last.add_cte(*(rider.cte(f"w{i}") for i, rider in enumerate(riders)))


def _value(table: Table, t: int, r: int, column: str, kind: str) -> Any:
    if kind == "now":
        return clock.now("postgresql")
    if kind == "later":
        return clock.later("postgresql", _name(t, r, column))
    return bindparam(_name(t, r, column), type_=table.c[column].type)
