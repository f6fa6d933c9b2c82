"""Fixtures of the integration suite, on top of tests/conftest.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine

from db.engine import make_engine
from tests.conftest import InProcessServer


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    """An engine on a fresh, migrated database of each backend (a test file may define its own)."""
    engine = make_engine(migrated_url)
    yield engine
    engine.dispose()


@pytest.fixture
def quiet_server(database_url: str, start_server: Callable[..., InProcessServer]) -> InProcessServer:
    """A server on a fresh database of each backend that runs no saga: its orders stay PENDING.

    `database_url` comes first so that the server stops before its database is dropped."""
    return start_server(database_url=database_url, saga_workers=0)
