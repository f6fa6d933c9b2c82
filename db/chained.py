"""Rows for several tables in one INSERT statement (PostgreSQL's data-modifying CTEs).

`WITH w0 AS (INSERT INTO a ...), w1 AS (INSERT INTO b ...) INSERT INTO c ...` is one statement,
so one round trip and atomic on its own. The statement is built once per shape (tables, row
counts, columns) with named bind parameters and kept: SQLAlchemy then reuses its compiled form,
where `insert().values(rows)` built anew per call is compiled anew per call too (a fifth of a
PlaceOrder's CPU in a profile).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Insert, Table, bindparam, insert

from db import precompiled

Rows = Sequence[Mapping[str, Any]]
# (table, row count, column names) per table, in insert order.
_Shape = tuple[tuple[Table, int, tuple[str, ...]], ...]


def insert_together(
    connection: Connection, parts: Sequence[tuple[Table, Rows]], returning: bool = False
) -> list[int]:
    """Insert every part's rows, in order, in one statement; parts without rows are skipped. With
    `returning`, the primary key of the last row of the last part (one row is what needs it)."""
    prepared = statement_for(parts, returning)
    if prepared is None:
        return []
    result = precompiled.execute(connection, *prepared)
    return [int(key) for key in result.scalars()] if returning else []


def statement_for(
    parts: Sequence[tuple[Table, Rows]], returning: bool = False
) -> tuple[Insert, dict[str, Any]] | None:
    """The statement (built once per shape) and parameters of `insert_together`; None if no rows."""
    parts = [(table, rows) for table, rows in parts if rows]
    if not parts:
        return None
    shape = tuple((table, len(rows), tuple(rows[0])) for table, rows in parts)
    parameters = {
        _name(t, r, column): value
        for t, (_table, rows) in enumerate(parts)
        for r, row in enumerate(rows)
        for column, value in row.items()
    }
    return _statement(shape, returning), parameters


def _name(table: int, row: int, column: str) -> str:
    return f"p{table}_{row}_{column}"


@lru_cache(maxsize=128)
def _statement(shape: _Shape, returning: bool) -> Insert:
    # One single-row INSERT per row: SQLAlchemy does not cache a multi-row VALUES statement.
    inserts = [
        insert(table).values({c: bindparam(_name(t, r, c), type_=table.c[c].type) for c in columns})
        for t, (table, count, columns) in enumerate(shape)
        for r in range(count)
    ]
    *riders, last = inserts
    if returning:
        last = last.returning(*shape[-1][0].primary_key.columns)
    return last.add_cte(*(rider.cte(f"w{i}") for i, rider in enumerate(riders)))
