"""What the first calls after a start would otherwise pay for: the hot statements compiled, and
each pooled PostgreSQL connection's first look at the tables.

Each hot statement is compiled once, on first use (`db.precompiled`), and a new PostgreSQL backend
loads each table and index it meets into its own caches the first time: both were paid by the
first calls and saga steps after a start, under the GIL they share, which made a fresh server's
first orders several times slower than the rest (docs/performance.md, "Fourth round").
`compile_hot_statements` compiles what PlaceOrder, a saga step and a dispatcher round run, for
orders of up to `MOST_ITEMS` items (a larger order compiles its own shape on first use, as
before), touching no database; the pool's warm-up (`server.bootstrap`) has each connection it
opens look at every table first (`look_at_tables`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, inspect

from db import inventory, precompiled, queue
from db.backend import backend_of
from db.chained import statements_for
from db.orders import OrderRepository, settle_pending_statement
from db.outbox import OUTBOX, Lease, OutboxStore
from db.settlement import settle_and_complete_many_statement, settle_and_complete_statement
from db.tables import inventory_metadata, orders_metadata, outbox_events
from domain.model import Order, OrderItem

MOST_ITEMS = 4


def place_statements(dialect: str, most_items: int = MOST_ITEMS) -> list[Any]:
    """PlaceOrder's statements (`OrdersUnitOfWork.add_order`) for 1 to `most_items` items, with the
    event written leased (handed to a saga worker at commit) and not."""
    statements = []
    for count in range(1, most_items + 1):
        items = tuple(OrderItem(f"s{n}", 1) for n in range(count))
        order, placed = Order.place("warm", items, "warm", now=datetime.now(UTC))
        for lease in (None, Lease("warm", 1.0)):
            events = OutboxStore.new_rows([placed], "warm", order.create_time, lease, dialect)
            parts = [*OrderRepository.new_rows(order, "warm"), (outbox_events, events)]
            statements += [s for s, _, _ in statements_for(dialect, parts, returning=lease is not None)]
    return statements


def orders_statements(dialect: str) -> list[Any]:
    """The saga's settle and the dispatcher's rounds, on the orders database."""
    settles: list[Any]
    if backend_of(dialect).one_statement_writes:
        settles = [settle_and_complete_statement(), settle_and_complete_many_statement()]
    else:
        settles = [settle_pending_statement()]
    return [*place_statements(dialect), *settles, *queue.hot_statements(OUTBOX, dialect)]


def compile_hot_statements(orders: Engine, inventory_engine: Engine) -> int:
    """Compile the hot statements for each engine's dialect; how many there were."""
    work = [(orders, statement) for statement in orders_statements(orders.dialect.name)]
    work += [
        (inventory_engine, statement)
        for statement in inventory.hot_statements(inventory_engine.dialect.name, MOST_ITEMS)
    ]
    for engine, statement in work:
        precompiled.precompile(statement, engine.dialect)
    return len(work)


def service_tables(connection: Connection) -> list[str]:
    """The service's tables in this database (orders and inventory may live apart)."""
    present = set(inspect(connection).get_table_names())
    tables = [*orders_metadata.sorted_tables, *inventory_metadata.sorted_tables]
    return [table.name for table in tables if table.name in present]


def look_at_tables(connection: Connection, names: list[str]) -> None:
    """Plan a read of no rows from each table `names` lists (`service_tables`: our own, not input),
    in one round trip: the backend then has each table and its indexes in its caches before a
    call needs them."""
    quote = connection.dialect.identifier_preparer.quote
    reads = [f"SELECT * FROM {quote(name)} LIMIT 0" for name in names]  # noqa: S608
    if reads:
        connection.exec_driver_sql("; ".join(reads))
