"""Alembic environments, one per database: `orders` and `inventory` (each with its own version table)."""
