"""Alembic migrations are the source of the schema: an upgraded empty database is exactly the models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, inspect

from db import migrate
from db.tables import inventory_metadata, orders_metadata
from server import bootstrap
from server.config import Settings

PARTS = [
    pytest.param(migrate.ORDERS, orders_metadata, id="orders"),
    pytest.param(migrate.INVENTORY, inventory_metadata, id="inventory"),
]


@pytest.fixture
def engines(database_url: str) -> Iterator[bootstrap.Engines]:
    made = bootstrap.make_engines(Settings(database_url=database_url))
    yield made
    made.dispose()


def schema_drift(engine: Engine, metadata: MetaData) -> list[Any]:
    """Alembic's autogenerate diff between the database and `metadata`, limited to that part's tables
    (the other part may share the database; the alembic_version_* tables belong to neither)."""
    tables = set(metadata.tables)

    def include_name(name: str | None, type_: str, _parents: Any) -> bool:
        return name in tables if type_ == "table" else True

    def include_object(_obj: Any, name: str | None, type_: str, _reflected: bool, _compare_to: Any) -> bool:
        return name in tables if type_ == "table" else True

    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "include_name": include_name,
                "include_object": include_object,
                "compare_type": True,
                "compare_server_default": True,
                "target_metadata": metadata,
            },
        )
        return list(compare_metadata(context, metadata))


@pytest.mark.parametrize(("part", "metadata"), PARTS)
def test_upgrading_an_empty_database_gives_exactly_the_models_schema(engines, part, metadata):
    assert migrate.current(engines.orders, part) is None

    bootstrap.apply_migrations(engines)

    assert schema_drift(engines.orders, metadata) == []
    assert migrate.current(engines.orders, part) == migrate.head(part)
    assert migrate.is_current(engines.orders, part)


def test_the_schema_comparison_notices_a_model_the_migrations_do_not_create(engines):
    bootstrap.apply_migrations(engines)
    drifted = MetaData(naming_convention=orders_metadata.naming_convention)
    for table in orders_metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["orders"].append_column(Column("loyalty_points", Integer, nullable=True))

    drift = schema_drift(engines.orders, drifted)

    assert [(kind, table, column.name) for kind, _schema, table, column in drift] == [
        ("add_column", "orders", "loyalty_points")
    ]


def test_migrating_twice_changes_nothing(engines):
    bootstrap.apply_migrations(engines)
    tables_before = sorted(inspect(engines.orders).get_table_names())

    bootstrap.apply_migrations(engines)

    assert sorted(inspect(engines.orders).get_table_names()) == tables_before
    for part, metadata in ((migrate.ORDERS, orders_metadata), (migrate.INVENTORY, inventory_metadata)):
        assert migrate.current(engines.orders, part) == migrate.head(part)
        assert schema_drift(engines.orders, metadata) == []


def test_a_database_holds_both_parts_and_one_version_table_per_part(engines):
    bootstrap.apply_migrations(engines)

    assert sorted(inspect(engines.orders).get_table_names()) == sorted(
        [
            *orders_metadata.tables,
            *inventory_metadata.tables,
            "alembic_version_orders",
            "alembic_version_inventory",
        ]
    )


def test_a_separate_inventory_database_gets_only_the_inventory_tables(backend, database_url, request):
    if backend == "postgres":
        inventory_url = request.getfixturevalue("make_pg_database")()
    else:
        inventory_url = database_url.replace("orders.db", "inventory.db")
    split = bootstrap.make_engines(Settings(database_url=database_url, inventory_database_url=inventory_url))
    try:
        assert split.inventory is not split.orders

        bootstrap.apply_migrations(split)

        assert sorted(inspect(split.orders).get_table_names()) == sorted(
            [*orders_metadata.tables, "alembic_version_orders"]
        )
        assert sorted(inspect(split.inventory).get_table_names()) == sorted(
            [*inventory_metadata.tables, "alembic_version_inventory"]
        )
        assert schema_drift(split.orders, orders_metadata) == []
        assert schema_drift(split.inventory, inventory_metadata) == []
    finally:
        split.dispose()
