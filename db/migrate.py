"""Apply and inspect Alembic migrations of the orders and inventory databases."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

log = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"


@dataclass(frozen=True)
class Part:
    name: str  # "orders" or "inventory"

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.name}"

    def config(self) -> Config:
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS / self.name))
        return config


ORDERS = Part("orders")
INVENTORY = Part("inventory")


def upgrade(engine: Engine, part: Part) -> None:
    """Bring one database part to the newest revision (a no-op when it is there already)."""
    config = part.config()
    before = current(engine, part)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    after = current(engine, part)
    if after != before:
        log.info("%s schema migrated from %s to %s", part.name, before or "nothing", after)


@functools.cache
def head(part: Part) -> str | None:
    """The newest revision this code knows (read from the scripts once per process)."""
    return ScriptDirectory.from_config(part.config()).get_current_head()


def current(engine: Engine, part: Part) -> str | None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": part.version_table})
        return context.get_current_revision()


def is_current(engine: Engine, part: Part) -> bool:
    """True when the database's revision is the newest one this code knows."""
    return current(engine, part) == head(part)
