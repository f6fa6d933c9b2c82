"""Units of work: one database transaction each, rolled back unless `commit()` is called.

A unit of work owns the connection and the transaction; repositories only read and write rows on
the connection it hands them. Database failures leave it as domain errors (`db.errors.translate`).
The caller's deadline, when one is bound with `deadline_bound`, becomes PostgreSQL's
`statement_timeout` for the transaction, so a call whose client gave up does not leave its query
running.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Self

from sqlalchemy import Connection, Engine, RootTransaction

from db.chained import insert_together
from db.engine import SQLITE_BEGIN_IMMEDIATE, is_sqlite, prefix_next_statement
from db.errors import translate
from db.inventory import StockRepository
from db.orders import OrderRepository
from db.outbox import OutboxStore
from db.tables import outbox_events
from domain.errors import DeadlineExceededError
from domain.events import DomainEvent
from domain.model import Order

# time.monotonic() by which the current call must be done, or None.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("db_deadline", default=None)
# Below this, a transaction is not worth starting.
_MIN_BUDGET_MS = 5


@contextmanager
def deadline_bound(deadline: float | None) -> Iterator[None]:
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def remaining_ms() -> int | None:
    deadline = _DEADLINE.get()
    if deadline is None:
        return None
    return int((deadline - time.monotonic()) * 1000)


class UnitOfWork:
    """Base: a transaction on one engine. Use as a context manager; `commit()` or it rolls back."""

    def __init__(self, engine: Engine, *, write: bool = True) -> None:
        self._engine = engine
        self._write = write
        self._connection: Connection | None = None
        self._transaction: RootTransaction | None = None
        self._after_commit: list[Callable[[], None]] = []
        self._committed = False

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            raise RuntimeError("unit of work used outside its `with` block")
        return self._connection

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    def __enter__(self) -> Self:
        budget = remaining_ms()
        if budget is not None and budget < _MIN_BUDGET_MS:
            raise DeadlineExceededError("deadline exceeded before the database was reached")
        try:
            connection = self._engine.connect()
            if self._write and is_sqlite(self._engine):
                connection = connection.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True})
            self._connection = connection
            self._transaction = connection.begin()
            if budget is not None and not is_sqlite(self._engine):
                # With the first statement of the transaction, not a round trip of its own.
                prefix_next_statement(connection, f"SET LOCAL statement_timeout = {max(budget, 1)}")
        except Exception as error:
            self._close()
            domain_error = translate(error, deadline_set=budget is not None)
            if domain_error is not None:
                raise domain_error from error
            raise
        self._started()
        return self

    def _started(self) -> None:
        """Hook for subclasses to build repositories on the connection."""

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the transaction has committed (never if it rolls back)."""
        self._after_commit.append(callback)

    def commit(self) -> None:
        if self._transaction is None:
            raise RuntimeError("unit of work used outside its `with` block")
        self._transaction.commit()
        self._committed = True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if not self._committed and self._transaction is not None and self._transaction.is_active:
                self._transaction.rollback()
        except Exception:
            pass
        finally:
            self._close()
        if exc is not None:
            domain_error = translate(exc, deadline_set=_DEADLINE.get() is not None)
            if domain_error is not None:
                raise domain_error from exc
        if self._committed:
            for callback in self._after_commit:
                callback()

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        self._transaction = None


class OrdersUnitOfWork(UnitOfWork):
    """A transaction on the orders database: orders, their items and the outbox."""

    orders: OrderRepository
    outbox: OutboxStore

    def _started(self) -> None:
        self.orders = OrderRepository(self.connection)
        self.outbox = OutboxStore(self.connection)

    def add_order(
        self,
        order: Order,
        request_fingerprint: str | None,
        events: Sequence[DomainEvent],
        correlation_id: str | None,
    ) -> None:
        """A new order, its items and its events: on PostgreSQL one statement (the order and item
        inserts ride along as data-modifying CTEs of the outbox insert), on SQLite three. Placing
        an order is the hottest write; two round trips fewer is a third of its transaction."""
        if self.dialect != "postgresql":
            self.orders.add(order, request_fingerprint)
            self.outbox.add(events, correlation_id, order.create_time)
            return
        parts = [
            *OrderRepository.new_rows(order, request_fingerprint),
            (outbox_events, OutboxStore.new_rows(events, correlation_id, order.create_time)),
        ]
        insert_together(self.connection, parts)


class InventoryUnitOfWork(UnitOfWork):
    """A transaction on the inventory database: stock and reservations."""

    stock: StockRepository

    def _started(self) -> None:
        self.stock = StockRepository(self.connection)


OrdersUowFactory = Callable[..., OrdersUnitOfWork]
InventoryUowFactory = Callable[..., InventoryUnitOfWork]
