"""Statements run from SQL compiled once (db.precompiled) reach the driver exactly as
`connection.execute` would send them: the same SQL, the same processed parameters (by name to
psycopg2, as a tuple in placeholder order to sqlite3); what cannot be precompiled runs the usual
way and answers as it would."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, Float, Integer, String, bindparam, event, func, insert, select
from sqlalchemy.exc import DBAPIError, IntegrityError, MultipleResultsFound, NoResultFound

from db import clock, precompiled
from db.chained import _rows_statement, statement_for
from db.engine import make_engine
from db.inventory import (
    _apply_allocation,
    _earlier_reservations,
    _fence_many,
    _fence_parameters,
    _fence_statement,
    _guarded_decrement,
    _locked_levels,
    _reserve_all,
)
from db.orders import OrderRepository, settle_pending_statement
from db.outbox import OUTBOX, Lease, OutboxStore
from db.queue import (
    claim_statement,
    complete_and_claim_statement,
    complete_many_statement,
    complete_one_statement,
    renew_statement,
)
from db.settlement import settle_and_complete_many_statement, settle_and_complete_statement
from db.tables import order_items, orders, outbox_events, stock
from db.unit_of_work import OrdersUnitOfWork
from domain import deadline
from domain.errors import DeadlineExceededError
from domain.fencing import Fence
from domain.model import Order, OrderItem, Settlement, utcnow
from tests.support import apply_schema

postgres = pytest.mark.postgres


@pytest.fixture
def engine(make_pg_database: Callable[[], str]) -> Iterator[Engine]:
    engine = make_engine(apply_schema(make_pg_database()))
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    engine = make_engine(apply_schema(sqlite_url))
    yield engine
    engine.dispose()


def _sent(engine: Engine, run: Callable[[Connection], object]) -> tuple[str, Any]:
    """What reached the driver when `run` executed one statement (rolled back afterwards)."""
    (sent,) = _sent_all(engine, run)
    return sent


def _sent_all(engine: Engine, run: Callable[[Connection], object]) -> list[tuple[str, Any]]:
    """What reached the driver when `run` executed its statements (rolled back afterwards)."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, dict(parameters) if isinstance(parameters, Mapping) else tuple(parameters)))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with engine.connect() as connection, connection.begin() as transaction:
            run(connection)
            transaction.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return seen


def _same_either_way(engine: Engine, statement: Any, parameters: Mapping[str, Any]) -> None:
    usual_sql, usual = _sent(engine, lambda c: c.execute(statement, dict(parameters)))
    once_sql, once = _sent(engine, lambda c: precompiled.execute(c, statement, parameters))
    assert once_sql == usual_sql
    if isinstance(usual, tuple):  # sqlite3: by position
        assert once == usual
        return
    # Parameters the SQL does not name may ride along (the driver ignores them; `db.clock` gives
    # both databases' parameters): what it names must be the same.
    assert {name: once.get(name) for name in usual} == usual


@postgres
def test_the_claim_goes_out_as_sqlalchemy_would_send_it(engine: Engine) -> None:
    parameters = {"limit": 8, "token": "t-1", **clock.parameters(utcnow(), lease_s=30.0)}
    _same_either_way(engine, claim_statement(OUTBOX, "postgresql"), parameters)


@postgres
def test_a_lease_renewal_goes_out_as_sqlalchemy_would_send_it(engine: Engine) -> None:
    parameters = {"ids": [1, 2], "tokens": ["t-1"], **clock.parameters(utcnow(), lease_s=30.0)}
    _same_either_way(engine, renew_statement(OUTBOX, "postgresql"), parameters)


@postgres
def test_the_batch_completion_goes_out_as_sqlalchemy_would_send_it(engine: Engine) -> None:
    parameters = {"now": utcnow(), "ids": [1, 2, 3], "tokens": ["t-1", "t-2"]}
    _same_either_way(engine, complete_many_statement(OUTBOX, "postgresql"), parameters)
    one = {"now": parameters["now"], "event_id": 1, "token": "t-1"}
    _same_either_way(engine, complete_one_statement(OUTBOX), one)


@postgres
def test_the_place_statement_goes_out_as_sqlalchemy_would_send_it(engine: Engine) -> None:
    order, placed = Order.place("ann", (OrderItem("SKU-1", 2), OrderItem("SKU-2", 1)), "req-1", now=utcnow())
    parts = [
        *OrderRepository.new_rows(order, "fingerprint"),
        (outbox_events, OutboxStore.new_rows([placed], "corr-1", order.create_time, dialect="postgresql")),
    ]
    leased = OutboxStore.new_rows([placed], "corr-1", order.create_time, Lease("t-1", 30.0), "postgresql")
    assert [table for table, _ in parts] == [orders, order_items, outbox_events]
    for returning in (False, True):
        prepared = statement_for(parts, returning)
        assert prepared is not None
        _same_either_way(engine, *prepared)
    prepared = statement_for([*parts[:2], (outbox_events, leased)], returning=True)
    assert prepared is not None
    _same_either_way(engine, *prepared)


@postgres
def test_the_reservation_goes_out_as_sqlalchemy_would_send_it(engine: Engine) -> None:
    parameters = {"order_id": "o-1", "skus": ["SKU-1", "SKU-2"], "quantities": [2, 1], "now": utcnow()}
    _same_either_way(engine, _reserve_all(), parameters)
    _same_either_way(engine, _reserve_all(fenced=True), {**parameters, "fence_event": 7, "fence_claim": 2})


@postgres
def test_the_settle_and_completion_go_out_as_sqlalchemy_would_send_them(engine: Engine) -> None:
    parameters = OrderRepository.settle_parameters("o-1", Settlement.validated(), utcnow())
    parameters.update(event_id=7, token="t-1")
    _same_either_way(engine, settle_and_complete_statement(), parameters)


@postgres
def test_the_batch_statements_of_the_saga_go_out_as_sqlalchemy_would_send_them(engine: Engine) -> None:
    now = utcnow()
    fences = {"order_ids": ["o-1", "o-2"], "fence_events": [7, 8], "fence_claims": [1, 2], "now": now}
    _same_either_way(engine, _fence_many(), fences)
    _same_either_way(engine, _earlier_reservations(), {"order_ids": ["o-1", "o-2"]})
    _same_either_way(engine, _locked_levels(), {"skus": ["SKU-1", "SKU-2"]})
    writes = {
        "r_orders": ["o-1", "o-2"],
        "r_skus": ["SKU-1", "SKU-1"],
        "r_quantities": [1, 2],
        "r_statuses": ["ACTIVE", "RELEASED"],
        "t_skus": ["SKU-1"],
        "t_quantities": [1],
        "c_orders": ["o-2"],
        "c_reasons": ["insufficient stock"],
        "now": now,
    }
    _same_either_way(engine, _apply_allocation(), writes)
    settles = {
        "s_orders": ["o-1", "o-2"],
        "s_targets": ["VALIDATED", "FAILED"],
        "s_reasons": ["", "insufficient stock"],
        "s_events": [7, 8],
        "s_tokens": ["t-1", "t-1"],
        "now": now,
    }
    _same_either_way(engine, settle_and_complete_many_statement(), settles)


@postgres
def test_the_completion_with_a_claim_goes_out_as_sqlalchemy_would_send_it(engine: Engine) -> None:
    parameters = {
        "ids": [1, 2],
        "tokens": ["t-1"],
        "limit": 8,
        "token": "t-2",
        **clock.parameters(utcnow(), lease_s=30.0),
    }
    _same_either_way(engine, complete_and_claim_statement(OUTBOX), parameters)


@postgres
def test_a_statement_let_go_of_takes_its_compiled_form_with_it(engine: Engine) -> None:
    import gc

    from sqlalchemy import select

    statement = select(outbox_events.c.id).where(outbox_events.c.id == 1)
    with engine.connect() as connection:
        precompiled.execute(connection, statement, {})
    held = len(precompiled._compiled)
    del statement
    gc.collect()
    assert len(precompiled._compiled) == held - 1


# SQLite: the saga's one-order path and the place statements run precompiled there too.


def test_the_sqlite_place_statements_go_out_as_sqlalchemy_would_send_them(sqlite_engine: Engine) -> None:
    order, placed = Order.place("ann", (OrderItem("SKU-1", 2), OrderItem("SKU-2", 1)), "req-1", now=utcnow())
    parts = [
        *OrderRepository.new_rows(order, "fingerprint"),
        (outbox_events, OutboxStore.new_rows([placed], "corr-1", order.create_time, Lease("t-1", 30.0))),
    ]
    statements = []
    for index, (table, rows) in enumerate(parts):
        statement = _rows_statement(table, len(rows), tuple(rows[0]), index == len(parts) - 1)
        parameters = {f"p{r}_{column}": value for r, row in enumerate(rows) for column, value in row.items()}
        assert precompiled.precompile(statement, sqlite_engine.dialect) is not None
        statements.append((statement, parameters))

    def usual(connection: Connection) -> None:
        for statement, parameters in statements:
            connection.execute(statement, parameters)

    def once(connection: Connection) -> None:
        for statement, parameters in statements:
            precompiled.execute(connection, statement, parameters)

    # One transaction each way (the items refer to the order), rolled back.
    assert _sent_all(sqlite_engine, once) == _sent_all(sqlite_engine, usual)
    assert len(_sent_all(sqlite_engine, once)) == 3


def test_the_sqlite_saga_statements_go_out_as_sqlalchemy_would_send_them(sqlite_engine: Engine) -> None:
    now = utcnow()
    fence = _fence_parameters("o-1", Fence(event_id=7, claim=2), now)
    settle = OrderRepository.settle_parameters("o-1", Settlement.failed("insufficient stock"), now)
    for statement, parameters in (
        (_fence_statement("sqlite"), fence),
        (_guarded_decrement(), {"b_sku": "SKU-1", "quantity": 2, "now": now}),
        (settle_pending_statement(), settle),
        (complete_one_statement(OUTBOX), {"event_id": 7, "token": "t-1", "now": now}),
    ):
        assert precompiled.precompile(statement, sqlite_engine.dialect) is not None
        _same_either_way(sqlite_engine, statement, parameters)


def test_sqlite_dates_come_back_as_datetimes_and_a_list_runs_the_usual_way(sqlite_engine: Engine) -> None:
    """sqlite3 returns a date as text: in a transaction the claim is read off the driver's cursor
    and each date goes through the type's result processor, as SQLAlchemy would run it; outside a
    transaction it runs the usual way. An expanding list is rewritten per call, so the batch
    completion is never precompiled."""
    claim = claim_statement(OUTBOX, "sqlite")
    many = complete_many_statement(OUTBOX, "sqlite")
    assert precompiled.precompile(claim, sqlite_engine.dialect) is not None
    assert precompiled.precompile(many, sqlite_engine.dialect) is None
    at = utcnow()
    with sqlite_engine.begin() as connection:
        OutboxStore(connection).add_raw("o-1", "TEST", "{}", {}, at)
        OutboxStore(connection).add_raw("o-2", "TEST", "{}", {}, at)
        parameters = {"limit": 1, "token": "t-1", **clock.parameters(at, lease_s=30.0)}
        (row,) = precompiled.execute(connection, claim, parameters).all()
        assert type(row).__module__ != "sqlalchemy.engine.row", "read off the driver's cursor"
        assert row.claimed_at == at
        done = precompiled.execute(
            connection, many, {"now": at, "ids": [row.id], "leases": [(row.id, "t-1")]}
        )
        assert done.scalars().all() == [row.id]
    with sqlite_engine.connect() as connection:
        parameters = {"limit": 1, "token": "t-2", **clock.parameters(at, lease_s=30.0)}
        (row,) = precompiled.execute(connection, claim, parameters).all()
        assert row.claimed_at == at
        connection.rollback()


_READ_EVENT = select(outbox_events.c.id, outbox_events.c.created_at).where(
    outbox_events.c.id == bindparam("event_id", type_=Integer)
)


def test_outside_a_transaction_a_result_to_process_runs_the_usual_way(database_url: str) -> None:
    """Outside a transaction a precompiled statement whose result columns have processors (a
    `UTCDateTime`) goes through SQLAlchemy's execution, which begins the transaction and processes
    the rows: the driver's own values would be text on SQLite, and on PostgreSQL a time in the
    session's time zone."""
    engine = make_engine(apply_schema(database_url))
    try:
        at = utcnow()
        with engine.begin() as connection:
            OutboxStore(connection).add_raw("o-1", "TEST", "{}", {}, at)
        with engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                connection.exec_driver_sql("SET TIME ZONE 'Asia/Kolkata'")  # psycopg2 answers +05:30
                connection.commit()
            assert not connection.in_transaction()
            (row,) = precompiled.execute(connection, _READ_EVENT, {"event_id": 1}).all()
            connection.rollback()
        assert row.created_at == at
        assert row.created_at.tzinfo is UTC
    finally:
        engine.dispose()


# Prepared on PostgreSQL: parsed and planned once per connection.


def _place_statement() -> tuple[Any, dict[str, Any]]:
    order, placed = Order.place("ann", (OrderItem("SKU-1", 2),), None, now=utcnow())
    rows = OutboxStore.new_rows([placed], "corr-1", order.create_time, dialect="postgresql")
    prepared = statement_for([*OrderRepository.new_rows(order, None), (outbox_events, rows)])
    assert prepared is not None
    return prepared


@postgres
def test_a_prepared_statement_is_prepared_once_per_connection(engine: Engine) -> None:
    statement, _ = _place_statement()
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _k, sql, *_: sent.append(sql))
    with engine.connect() as connection:
        connection.connection.info.clear()  # a connection that prepared nothing yet
        for _ in range(3):
            with connection.begin():
                precompiled.execute(connection, statement, _place_statement()[1], prepare=True)
        prepared = connection.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalars().all()
    kinds = [sql.split()[0] for sql in sent if "pg_prepared_statements" not in sql]
    assert kinds == ["PREPARE", "EXECUTE", "EXECUTE"], sent
    assert len(prepared) == 1
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM orders").scalar() == 3


@postgres
def test_a_statement_whose_first_run_failed_is_prepared_again_under_a_new_name(engine: Engine) -> None:
    """A prepared statement outlives the rollback of the query that prepared it; whether the PREPARE
    ran before an error is not known, so the next run must not reuse the name."""
    statement, parameters = _place_statement()
    with engine.connect() as connection:
        connection.connection.info.clear()
        with connection.begin():
            precompiled.execute(connection, statement, parameters)  # the order, not prepared
        connection.connection.info.clear()
        with pytest.raises(IntegrityError), connection.begin():  # the same order again: its key
            precompiled.execute(connection, statement, parameters, prepare=True)
        with connection.begin():
            precompiled.execute(connection, statement, _place_statement()[1], prepare=True)
        assert connection.exec_driver_sql("SELECT count(*) FROM orders").scalar() == 2
        names = connection.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalars().all()
    assert len(names) == 2  # the first PREPARE stayed, unused


# On the driver's cursor (`precompiled._on_driver`): inside a transaction a statement skips
# SQLAlchemy's execution; what that execution did for it still happens.

_LEVELS = (
    select(
        stock.c.sku,
        stock.c.available,
        (stock.c.available - bindparam("least", type_=Integer)).label("over"),
    )
    .where(stock.c.sku >= bindparam("from_sku", type_=String))
    .order_by(stock.c.sku)
)
_SLEEP = select(func.pg_sleep(bindparam("seconds", type_=Float)))


def _stocked(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(
            insert(stock),
            [{"sku": sku, "available": n, "reserved": 0, "version": 1, "update_time": utcnow()} for sku, n in
             (("A", 1), ("B", 5), ("C", 9))],
        )  # fmt: skip


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_rows_read_on_the_driver_answer_as_sqlalchemys_would(
    backend: str, request: pytest.FixtureRequest
) -> None:
    engine: Engine = request.getfixturevalue("engine" if backend == "postgresql" else "sqlite_engine")
    _stocked(engine)
    with engine.connect() as connection, connection.begin():
        once = precompiled.execute(connection, _LEVELS, {"from_sku": "B", "least": 6})
        usual = connection.execute(_LEVELS, {"from_sku": "B", "least": 6})
        assert isinstance(once, precompiled.Rows), "the driver's cursor answered"
        rows, usual_rows = once.all(), usual.all()
        expected = [("B", 5, -1), ("C", 9, 3)]
        assert [tuple(row) for row in rows] == [tuple(row) for row in usual_rows] == expected
        assert [(row.sku, row.available, row.over) for row in rows] == expected

        def levels(from_sku: str) -> precompiled.Result:
            return precompiled.execute(connection, _LEVELS, {"from_sku": from_sku, "least": 0})

        assert levels("C").one().sku == "C"
        assert levels("A").scalars().all() == ["A", "B", "C"]
        assert levels("D").first() is None
        with pytest.raises(NoResultFound):
            levels("D").one()
        with pytest.raises(MultipleResultsFound):
            levels("A").one()
        taking = {"b_sku": "B", "quantity": 5, "now": utcnow()}
        assert precompiled.execute(connection, _guarded_decrement(), taking).rowcount == 1
        assert precompiled.execute(connection, _guarded_decrement(), taking).rowcount == 0


@postgres
def test_a_statement_on_the_driver_carries_the_deadline_as_its_statement_timeout(engine: Engine) -> None:
    began = time.monotonic()
    with (
        deadline.deadline_bound(began + 0.3),
        pytest.raises(DeadlineExceededError),
        OrdersUnitOfWork(engine) as uow,
    ):
        precompiled.execute(uow.connection, _SLEEP, {"seconds": 5.0})
    assert time.monotonic() - began < 2.0, "PostgreSQL cancelled the statement at the deadline"


@postgres
def test_a_connection_lost_under_a_statement_on_the_driver_is_invalidated(engine: Engine) -> None:
    with engine.connect() as connection:
        backend = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        connection.rollback()
        with make_engine(str(engine.url)).connect() as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({int(backend)})")  # type: ignore[arg-type]
        with pytest.raises(DBAPIError) as raised, connection.begin():
            precompiled.execute(connection, _LEVELS, {"from_sku": "A", "least": 0})
        assert raised.value.connection_invalidated
        assert connection.invalidated
    with engine.connect() as connection:  # the pool gives a live connection again
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1
