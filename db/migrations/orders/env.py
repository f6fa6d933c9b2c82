"""Alembic environment of the orders database."""

from alembic import context

from db.migrations.common import run
from db.tables import orders_metadata

run(context, orders_metadata, version_table="alembic_version_orders")
