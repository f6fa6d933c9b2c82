"""On SQLite a unit of work runs on the sqlite3 connection too (db.driver.Session): BEGIN goes
straight to the driver (IMMEDIATE for a writer), the hot statements run on its cursor, and no
SQLAlchemy `Connection` is built unless a statement needs one; COMMIT and ROLLBACK end the
transaction on the driver, and the connection goes back to the pool with none open."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from db.driver import Session
from db.engine import EngineSettings, make_engine
from db.unit_of_work import OrdersUnitOfWork
from domain.errors import ConflictError
from tests.support import apply_schema, orders_stored, place_in


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    # One connection: every unit of work below gets the connection the one before gave back.
    engine = make_engine(apply_schema(sqlite_url), EngineSettings(pool_size=1, max_overflow=0))
    yield engine
    engine.dispose()


@pytest.fixture
def other(engine: Engine) -> Iterator[sqlite3.Connection]:
    """A second connection to the same file, outside the engine and its writer gate, that does not
    wait for SQLite's lock."""
    path = engine.url.database
    assert path is not None
    connection = sqlite3.connect(path, timeout=0, isolation_level=None)
    yield connection
    connection.close()


def test_a_place_transaction_builds_no_sqlalchemy_connection(engine: Engine) -> None:
    with OrdersUnitOfWork(engine) as uow:
        session = uow.session
        assert isinstance(session, Session)
        place_in(uow, "req-1")
        assert session.opened is None
        uow.commit()
    assert orders_stored(engine) == 1


def test_a_writer_holds_the_write_lock_from_its_begin_until_it_ends(
    engine: Engine, other: sqlite3.Connection
) -> None:
    """BEGIN IMMEDIATE: a writer that reads first cannot meet "database is locked" at its first
    write; a reader's BEGIN takes no lock."""
    with OrdersUnitOfWork(engine), pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    with OrdersUnitOfWork(engine, write=False):
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")


def test_without_commit_nothing_is_kept_and_the_connection_is_reused_clean(
    engine: Engine, other: sqlite3.Connection
) -> None:
    with OrdersUnitOfWork(engine) as uow:
        place_in(uow, "req-1")
    assert orders_stored(engine) == 0
    other.execute("BEGIN IMMEDIATE")  # no transaction was left open on the pooled connection
    other.execute("ROLLBACK")
    with OrdersUnitOfWork(engine) as uow:
        place_in(uow, "req-2")
        uow.commit()
    assert orders_stored(engine) == 1


def test_a_key_taken_is_a_conflict_and_the_transaction_is_rolled_back(
    engine: Engine, other: sqlite3.Connection
) -> None:
    with OrdersUnitOfWork(engine) as uow:
        place_in(uow, "req-1")
        uow.commit()
    with pytest.raises(ConflictError), OrdersUnitOfWork(engine) as uow:
        place_in(uow, "req-1")
        uow.commit()
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    with OrdersUnitOfWork(engine) as uow:
        place_in(uow, "req-2")
        uow.commit()
    assert orders_stored(engine) == 2
