"""Planner statistics on PostgreSQL when nothing else keeps them (autovacuum off).

Without statistics the planner takes a table for a few pages. For the outbox that is the worst
guess: the claim then gathers every PENDING row, checks each for an earlier event of its order,
and sorts them all, so a claim costs in proportion to the backlog exactly when there is one (a
backlog drained less than half as fast before an ANALYZE as after; docs/performance.md). Autovacuum
analyzes a table once 50 rows + 10 % of it changed; `stale` applies the same rule, for a caller
(the housekeeper) to ANALYZE in its place.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, text

from db.backend import backend_of

ORDERS_TABLES = ("outbox_events", "orders", "order_items")


def autovacuum_on(connection: Connection) -> bool:
    return str(connection.execute(text("SHOW autovacuum")).scalar_one()).lower() in ("on", "true", "1")


def need_keeping(connection: Connection) -> bool:
    """Whether someone must ANALYZE for the planner here: a backend that keeps statistics, with
    autovacuum off."""
    return backend_of(connection).keeps_statistics and not autovacuum_on(connection)


def stale(connection: Connection, tables: Sequence[str]) -> list[str]:
    """The tables with more rows changed since their last ANALYZE than autovacuum would allow."""
    rows = connection.execute(
        text(
            "SELECT relname FROM pg_stat_user_tables WHERE relname = ANY(:tables)"
            " AND schemaname = current_schema() AND n_mod_since_analyze > 50 + 0.1 * n_live_tup"
            " ORDER BY relname"
        ),
        {"tables": list(tables)},
    )
    return [str(name) for name in rows.scalars()]


def analyze(connection: Connection, table: str) -> None:
    if table not in ORDERS_TABLES:  # a name from this module only: it goes into the SQL as is
        raise ValueError(f"not a table of the orders database: {table!r}")
    connection.execute(text(f'ANALYZE "{table}"'))
