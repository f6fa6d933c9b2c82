"""A PostgreSQL unit of work's statements on the pooled driver connection (`db.driver.Session`):
a transaction of precompiled statements builds no SQLAlchemy `Connection`; one opened later for a
statement that needs it is the same transaction, and the BEGIN and deadline prefix goes with
whichever statement comes first; driver errors reach the caller as SQLAlchemy's would, and a lost
connection is discarded."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, Float, bindparam, event, func, select, text

from db import precompiled
from db.driver import Session
from db.engine import EngineSettings, make_engine
from db.tables import orders
from db.unit_of_work import OrdersUnitOfWork
from domain.deadline import deadline_bound
from domain.errors import ConflictError, DeadlineExceededError, UnavailableError
from tests.support import apply_schema, orders_stored, place_in

pytestmark = pytest.mark.postgres

_SLEEP = select(func.pg_sleep(bindparam("seconds", type_=Float)))
_BACKEND = select(func.pg_backend_pid())


@pytest.fixture
def engine(make_pg_database: Callable[[], str]) -> Iterator[Engine]:
    # One connection: every unit of work below gets the connection the one before gave back,
    # never pinged at checkout (the lost connection's test finds it dead by using it).
    settings = EngineSettings(pool_size=1, max_overflow=0, ping_after_idle_s=3600.0)
    engine = make_engine(apply_schema(make_pg_database()), settings)
    yield engine
    engine.dispose()


def test_a_place_transaction_builds_no_sqlalchemy_connection(engine: Engine) -> None:
    with OrdersUnitOfWork(engine) as uow:
        place_in(uow, "req-1")
        session = uow.session
        assert isinstance(session, Session)
        assert session.opened is None, "the place statement ran on the driver's cursor"
        uow.commit()
    assert orders_stored(engine) == 1


@pytest.mark.parametrize("first", ["driver", "sqlalchemy"])
def test_either_path_first_begins_the_one_transaction_of_both(engine: Engine, first: str) -> None:
    """Rolled back at the end: had the prefix (BEGIN) been lost, or sent twice, the first write
    would have committed on its own (the driver is in autocommit) or the second would fail."""
    with OrdersUnitOfWork(engine) as uow:
        if first == "driver":
            place_in(uow, "req-1")
            seen = uow.connection.execute(select(func.count()).select_from(orders)).scalar_one()
            assert seen == 1, "SQLAlchemy's connection is in the driver path's transaction"
        else:
            assert uow.connection.execute(select(func.count()).select_from(orders)).scalar_one() == 0
            place_in(uow, "req-1")
        assert uow.connection.execute(text("SELECT count(*) FROM orders")).scalar_one() == 1
    assert orders_stored(engine) == 0
    with OrdersUnitOfWork(engine) as uow:  # the connection went back with no transaction open
        place_in(uow, "req-2")
        uow.commit()
    assert orders_stored(engine) == 1


def test_listeners_of_the_engine_see_the_statement_and_a_sqlalchemy_connection(engine: Engine) -> None:
    seen: list[tuple[Any, str]] = []

    def record(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append((conn, statement))

    event.listen(engine, "before_cursor_execute", record)
    try:
        with OrdersUnitOfWork(engine) as uow:
            place_in(uow, "req-1")
            uow.commit()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(seen) == 1
    conn, statement = seen[0]
    assert isinstance(conn, Connection)
    assert statement.startswith("BEGIN; ") and "EXECUTE orders_" in statement


def test_a_key_taken_on_the_driver_path_is_a_conflict(engine: Engine) -> None:
    with OrdersUnitOfWork(engine) as uow:
        place_in(uow, "req-1")
        uow.commit()
    with pytest.raises(ConflictError), OrdersUnitOfWork(engine) as uow:
        place_in(uow, "req-1")
    with OrdersUnitOfWork(engine) as uow:  # and the connection is usable again
        place_in(uow, "req-2")
        uow.commit()
    assert orders_stored(engine) == 2


def test_the_deadline_is_the_driver_paths_statement_timeout(engine: Engine) -> None:
    began = time.monotonic()
    with (
        deadline_bound(began + 0.3),
        pytest.raises(DeadlineExceededError),
        OrdersUnitOfWork(engine) as uow,
    ):
        precompiled.execute(uow.session, _SLEEP, {"seconds": 5.0})
    assert time.monotonic() - began < 2.0, "PostgreSQL cancelled the statement at the deadline"


def test_a_connection_lost_under_the_driver_path_is_discarded(engine: Engine) -> None:
    with OrdersUnitOfWork(engine) as uow:
        backend = precompiled.execute(uow.session, _BACKEND, {}).scalars().all()[0]
        uow.commit()
    killer = make_engine(str(engine.url))
    try:
        with killer.connect() as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({int(backend)})")
    finally:
        killer.dispose()
    with pytest.raises(UnavailableError), OrdersUnitOfWork(engine) as uow:
        place_in(uow, "req-1")  # on the terminated backend: the pool's only connection
    with OrdersUnitOfWork(engine) as uow:  # the pool opened a new one
        assert precompiled.execute(uow.session, _BACKEND, {}).scalars().all()[0] != backend
        place_in(uow, "req-2")
        uow.commit()
    assert orders_stored(engine) == 1


_READ_CREATED = select(orders.c.id, orders.c.create_time).where(
    orders.c.request_id == bindparam("request_id")
)


def test_a_result_that_sqlalchemy_would_process_is_processed_on_the_driver_path(engine: Engine) -> None:
    """`create_time` is a `UTCDateTime`: SQLAlchemy runs its result processor; the driver path runs
    the same one (an aware UTC datetime, whatever the session's time zone), and builds no
    SQLAlchemy `Connection` for it."""
    read = _READ_CREATED
    with OrdersUnitOfWork(engine) as uow:
        place_in(uow, "req-1")
        uow.commit()
    with engine.connect() as connection:
        expected = connection.execute(read, {"request_id": "req-1"}).one()
    for prepare in (False, True):
        with OrdersUnitOfWork(engine, write=False) as uow:
            session = uow.session
            assert isinstance(session, Session)
            session.run("SET LOCAL TIME ZONE 'Asia/Kolkata'", ())  # psycopg2 answers +05:30
            row = precompiled.execute(session, read, {"request_id": "req-1"}, prepare=prepare).one()
            assert session.opened is None
        assert (row.id, row.create_time) == tuple(expected)
        assert row.create_time.tzinfo is UTC is expected.create_time.tzinfo


def test_a_sqlalchemy_connection_in_a_transaction_gets_processed_results_from_the_driver_too(
    engine: Engine,
) -> None:
    """The same statement through `db.precompiled` on a caller's own SQLAlchemy `Connection`."""
    with OrdersUnitOfWork(engine) as uow:
        place_in(uow, "req-1")
        uow.commit()
    with engine.connect() as connection, connection.begin():
        expected = connection.execute(_READ_CREATED, {"request_id": "req-1"}).one()
        connection.exec_driver_sql("SET LOCAL TIME ZONE 'Asia/Kolkata'")
        for prepare in (False, True):
            read = precompiled.execute(connection, _READ_CREATED, {"request_id": "req-1"}, prepare=prepare)
            row = read.one()
            assert type(row) is not type(expected), "read off the driver's cursor, not a SQLAlchemy Row"
            assert (row.id, row.create_time) == tuple(expected)
            assert row.create_time.tzinfo is UTC
