"""A started server has compiled the statements of PlaceOrder, the saga and the dispatcher's rounds
(db.warm): its first orders compile none of them, handed to a saga worker at commit or claimed by a
round, on either database. Its warmed PostgreSQL connections have looked at their tables."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from orders_service_api.v1 import orders_pb2 as pb

from db import migrate, precompiled, warm
from db.engine import make_engine
from db.tables import inventory_metadata, orders_metadata
from tests.conftest import InProcessServer
from tests.integration.saga_support import wait_for_status

SKUS = [f"WARM-{n}" for n in range(warm.MOST_ITEMS)]


def _compiled() -> set[tuple[int, str]]:
    return {
        (id(statement), dialect) for statement, forms in precompiled._compiled.items() for dialect in forms
    }


def test_the_first_orders_of_a_started_server_compile_no_statement(
    database_url: str, start_server: Callable[..., InProcessServer]
) -> None:
    precompiled._compiled.clear()  # as in a fresh process
    quiet = start_server(database_url=database_url, saga_workers=0)
    sagas = start_server(database_url=database_url)
    compiled_at_start = _compiled()
    assert compiled_at_start

    for sku in SKUS:
        quiet.stubs.set_stock(sku, 100)
    # Written without a lease (no saga worker here), then claimed by the other server's rounds.
    claimed = [quiet.stubs.place("warm", [(sku, 1) for sku in SKUS[:count]]) for count in range(1, 5)]
    # Written leased to an idle saga worker of this server, and handed to it at commit.
    handed = [sagas.stubs.place("warm", [(sku, 1) for sku in SKUS[:count]]) for count in range(1, 5)]
    for order in (*claimed, *handed):
        assert wait_for_status(sagas.stubs, order.order_id).status == pb.ORDER_STATUS_VALIDATED

    compiled_late = _compiled() - compiled_at_start
    late = [
        str(statement)[:200]
        for statement, forms in precompiled._compiled.items()
        for dialect in forms
        if (id(statement), dialect) in compiled_late
    ]
    assert not compiled_late, late


@pytest.mark.postgres
def test_a_warmed_connection_looks_at_the_tables_its_database_holds(
    make_pg_database: Callable[[], str],
) -> None:
    """Orders and inventory may live in databases of their own: each connection reads no rows
    from the tables its database has, and names none it lacks."""
    engine = make_engine(make_pg_database())
    try:
        migrate.upgrade(engine, migrate.ORDERS)
        with engine.connect() as connection:
            names = warm.service_tables(connection)
            warm.look_at_tables(connection, names)
        assert set(names) == {table.name for table in orders_metadata.sorted_tables}
        assert not set(names) & {table.name for table in inventory_metadata.sorted_tables}
    finally:
        engine.dispose()
