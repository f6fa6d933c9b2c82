"""Transactions on PostgreSQL, sent by the unit of work rather than psycopg2: BEGIN rides with the
first statement, a single-statement read is a transaction of its own (no BEGIN, no ROLLBACK), and
the pooled connection always goes back with no transaction open."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import psycopg2.extensions
import pytest
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.exc import DBAPIError

from db.engine import EngineSettings, make_engine
from db.tables import orders, outbox_events
from db.unit_of_work import OrdersUnitOfWork
from domain.deadline import deadline_bound
from domain.errors import DeadlineExceededError
from domain.model import Order, OrderItem, utcnow
from saga.dispatcher import DispatcherSettings, OutboxDispatcher
from saga.verdicts import Done
from tests.support import apply_schema, wait_until

pytestmark = pytest.mark.postgres


@pytest.fixture
def engine(make_pg_database: Callable[[], str]) -> Iterator[Engine]:
    # One connection: every unit of work below gets the connection the one before gave back.
    engine = make_engine(apply_schema(make_pg_database()), EngineSettings(pool_size=1, max_overflow=0))
    yield engine
    engine.dispose()


def _place(uow: OrdersUnitOfWork, request_id: str) -> Order:
    order, placed = Order.place("ann", (OrderItem("SKU-1", 1),), request_id, now=utcnow())
    uow.add_order(order, "fingerprint", [placed], "corr-1")
    return order


def _orders_in_table(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(orders)).scalar_one())


def _orders_seen_elsewhere(engine: Engine) -> int:
    """The orders another connection (outside the pool) sees."""
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    connection = psycopg2.connect(*args, **kwargs)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM orders")
            return int(cursor.fetchone()[0])
    finally:
        connection.close()


def _read(engine: Engine, order_id: str) -> tuple[Order | None, int]:
    """A single-statement read of the order, and psycopg2's transaction status right after it."""
    with OrdersUnitOfWork(engine, write=False, single_statement=True) as uow:
        order = uow.orders.get(order_id)
        dbapi = uow.connection.connection.dbapi_connection
        assert dbapi is not None
        return order, dbapi.info.transaction_status


def test_a_single_read_leaves_no_transaction_open(engine: Engine) -> None:
    with OrdersUnitOfWork(engine) as uow:
        placed = _place(uow, "req-1")
        uow.commit()
    order, status = _read(engine, placed.order_id)
    assert order == placed
    # In a transaction psycopg2 would stand INTRANS until the ROLLBACK; this one never began.
    assert status == psycopg2.extensions.TRANSACTION_STATUS_IDLE


def test_the_connection_goes_back_to_the_pool_with_transactions_as_usual(engine: Engine) -> None:
    assert _read(engine, "no-such-order")[0] is None
    # The same (only) connection, in an ordinary unit of work: rolled back, nothing stays.
    with OrdersUnitOfWork(engine) as uow:
        _place(uow, "req-1")
        dbapi = uow.connection.connection.dbapi_connection
        assert dbapi is not None
        assert dbapi.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
    assert _orders_in_table(engine) == 0


def test_the_statement_timeout_still_bounds_the_statement_and_ends_with_it(engine: Engine) -> None:
    with (
        deadline_bound(time.monotonic() + 0.2),
        pytest.raises(DeadlineExceededError),
        OrdersUnitOfWork(engine, write=False, single_statement=True) as uow,
    ):
        uow.connection.execute(text("SELECT pg_sleep(2)"))
    with OrdersUnitOfWork(engine) as uow:  # the same connection: the timeout was the statement's alone
        assert uow.connection.execute(text("SHOW statement_timeout")).scalar_one() != "200ms"
        _place(uow, "req-1")  # and this is rolled back at the end of the block
    assert _orders_in_table(engine) == 0


def test_a_later_statement_that_outlasts_the_deadline_ends_as_deadline_exceeded(engine: Engine) -> None:
    """PostgreSQL's statement_timeout, set to the budget left as the transaction starts, runs per
    statement: a second statement starting late would be cancelled past the deadline, and the
    client gives up first (at the deadline plus a grace). That is still the caller's deadline,
    not an outage: DEADLINE_EXCEEDED, not UNAVAILABLE."""
    started = time.monotonic()
    with (
        deadline_bound(started + 0.8),
        pytest.raises(DeadlineExceededError),
        OrdersUnitOfWork(engine, write=False) as uow,
    ):
        uow.connection.execute(text("SELECT pg_sleep(0.7)"))  # within the budget of 800 ms
        uow.connection.execute(text("SELECT pg_sleep(3)"))  # its own 800 ms would end at 1.5 s
    assert time.monotonic() - started < 2.0
    with OrdersUnitOfWork(engine) as uow:  # the pool serves again
        _place(uow, "req-1")
        uow.commit()
    assert _orders_in_table(engine) == 1


def test_a_write_begins_with_its_first_statement_and_commits_once_asked(engine: Engine) -> None:
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        with OrdersUnitOfWork(engine) as uow:
            _place(uow, "req-1")
            dbapi = uow.connection.connection.dbapi_connection
            assert dbapi is not None
            # psycopg2 would send BEGIN as a round trip of its own, were it not in autocommit.
            assert dbapi.autocommit
            assert dbapi.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
            assert _orders_seen_elsewhere(engine) == 0  # not visible before the commit
            uow.commit()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(sent) == 1 and sent[0].startswith("BEGIN; ")
    assert _orders_in_table(engine) == 1


def test_a_commit_after_a_failed_statement_raises_and_writes_nothing(engine: Engine) -> None:
    with pytest.raises(RuntimeError, match="failed statement"), OrdersUnitOfWork(engine) as uow:
        _place(uow, "req-1")
        with contextlib.suppress(DBAPIError):
            uow.connection.execute(text("SELECT 1 / 0"))
        uow.commit()  # COMMIT now would answer ROLLBACK, which psycopg2 does not raise on
    assert _orders_in_table(engine) == 0
    with OrdersUnitOfWork(engine) as uow:  # and the connection serves the next one as usual
        _place(uow, "req-2")
        uow.commit()
    assert _orders_in_table(engine) == 1


def test_a_connection_left_in_a_transaction_is_not_pooled_again(engine: Engine) -> None:
    with OrdersUnitOfWork(engine) as uow:
        _place(uow, "req-1")
        dbapi = uow.connection.connection.dbapi_connection
        uow._end_transaction = lambda _command: None  # type: ignore[method-assign,assignment]  # ROLLBACK lost
    assert dbapi is not None and dbapi.closed  # discarded with its open transaction
    with OrdersUnitOfWork(engine) as uow:
        assert uow.connection.connection.dbapi_connection is not dbapi
        _place(uow, "req-2")
        uow.commit()
    assert _orders_in_table(engine) == 1


def test_a_dispatcher_round_is_a_transaction_of_its_own(engine: Engine) -> None:
    """The dispatcher's round (DONE marks and a claim, one statement) sends no BEGIN, so no COMMIT
    either: a round trip fewer per round (see saga.dispatcher)."""
    with OrdersUnitOfWork(engine) as uow:
        for n in range(3):
            uow.outbox.add_raw(f"order-{n}", "TEST", "{}", {}, utcnow())
        uow.commit()
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    settings = DispatcherSettings(workers=2, poll_interval_s=0.05)
    dispatcher = OutboxDispatcher(partial(OrdersUnitOfWork, engine), {"TEST": lambda _e: Done()}, settings)
    dispatcher.start()
    try:
        wait_until(lambda: dispatcher.stats.done == 3, what="three events DONE")
    finally:
        dispatcher.stop(5.0)
        event.remove(engine, "before_cursor_execute", record)
    rounds = [statement for statement in sent if "UPDATE outbox_events" in statement]
    assert rounds, sent
    assert not [statement for statement in rounds if statement.lstrip().upper().startswith("BEGIN")], rounds
    with engine.connect() as connection:
        statuses = connection.execute(select(outbox_events.c.status)).scalars().all()
    assert statuses == ["DONE"] * 3
