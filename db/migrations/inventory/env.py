"""Alembic environment of the inventory database."""

from alembic import context

from db.migrations.common import run
from db.tables import inventory_metadata

run(context, inventory_metadata, version_table="alembic_version_inventory")
