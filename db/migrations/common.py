"""What both Alembic env.py files do: run migrations on the connection `db.migrate` hands them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import MetaData


def run(context: Any, metadata: MetaData, version_table: str) -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through `orders-server migrate` (db.migrate), not the alembic CLI")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=version_table,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
