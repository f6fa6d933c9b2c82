"""Units of work: one database transaction each, rolled back unless `commit()` is called.

The orders database's is here; the inventory's (`db.inventory.InventoryUnitOfWork`) lives with its
repository, so that what works on orders and the outbox alone (the dispatcher) imports nothing of
the inventory.

A unit of work owns the connection and the transaction; repositories only read and write rows on
the connection it hands them. Database failures leave it as domain errors (`db.errors.translate`).
The caller's deadline, when one is bound (`domain.deadline`), becomes PostgreSQL's
`statement_timeout` for the transaction, so a call whose client gave up does not leave its query
running.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import psycopg2
from psycopg2.extensions import STATUS_READY, TRANSACTION_STATUS_IDLE, TRANSACTION_STATUS_INERROR
from sqlalchemy import (
    Connection,
    Engine,
    PoolProxiedConnection,
    RootTransaction,
)
from sqlalchemy import exc as sa_exc

from db import precompiled
from db.backend import backend_of
from db.chained import insert_together
from db.driver import Session
from db.engine import (
    WriterGate,
    begin_sqlite,
    is_sqlite,
    prefix_next_statement,
    sqlite_command,
    writer_gate,
)
from db.errors import translate, waited_past_deadline
from db.orders import OrderRepository
from db.outbox import ClaimedEvent, Lease, OutboxStore
from db.settlement import settle_and_complete_many_statement, settle_and_complete_statement
from db.tables import outbox_events
from domain import deadline
from domain.errors import DeadlineExceededError, UnavailableError
from domain.events import DomainEvent
from domain.model import Order, Settlement

# Below this, a transaction is not worth starting.
_MIN_BUDGET_MS = 5


class UnitOfWork:
    """Base: a transaction on one engine. Use as a context manager; `commit()` or it rolls back.

    `single_statement=True` is the caller's promise to run at most one statement. On PostgreSQL
    that statement is then its own transaction (see `_take_transaction_control`), which saves the
    BEGIN and the COMMIT or ROLLBACK round trips. A write sent that way commits when the server
    runs it, even after its caller gave up on it (a deadline passed while the network held the
    statement back), and API.md promises that work abandoned at the deadline is not done later:
    so the calls' writes send COMMIT only after their statements answered in time, and a single
    statement is for reads and for writes whose late commit breaks no promise (the outbox
    dispatcher's rounds, see saga.dispatcher)."""

    def __init__(self, engine: Engine, *, write: bool = True, single_statement: bool = False) -> None:
        self._engine = engine
        self._write = write
        self._single_statement = single_statement
        self._autocommitting: Any = None  # the DBAPI connection whose transactions this one sends
        self._sqlite: Any = None  # on SQLite, the sqlite3 connection whose transaction this one sends
        self._session: Session | None = None
        self._connection: Connection | None = None  # SQLAlchemy's, once opened
        self._transaction: RootTransaction | None = None
        self._after_commit: list[Callable[[], None]] = []
        self._committed = False
        self._gate: WriterGate | None = None

    @property
    def session(self) -> Session:
        """What the repositories run statements on: a `db.driver.Session` on the pooled connection."""
        if self._session is None:
            raise RuntimeError("unit of work used outside its `with` block")
        return self._session

    @property
    def connection(self) -> Connection:
        """SQLAlchemy's `Connection` in this transaction (opened on first use)."""
        return self.session.sqlalchemy()

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    def __enter__(self) -> Self:
        budget = deadline.remaining_ms()
        if budget is not None and budget < _MIN_BUDGET_MS:
            raise DeadlineExceededError("deadline exceeded before the database was reached")
        if self._write:
            self._pass_gate(budget)
        try:
            if is_sqlite(self._engine):
                self._start_on_sqlite()
            else:
                self._start_on_driver(budget)
        except Exception as error:
            self._close()
            domain_error = translate(error, deadline_set=budget is not None)
            if domain_error is not None:
                raise domain_error from error
            raise
        self._started()
        return self

    def _checkout(self) -> PoolProxiedConnection:
        try:
            return self._engine.raw_connection()
        except self._engine.dialect.loaded_dbapi.Error as error:
            Connection._handle_dbapi_exception_noconnection(error, self._engine.dialect, self._engine)
            raise  # not reached: the handler raises it wrapped

    def _start_on_sqlite(self) -> None:
        """SQLite: a pooled sqlite3 connection, BEGIN (IMMEDIATE for a writer, which takes SQLite's
        write lock now rather than at its first write) sent on it directly (`db.engine.begin_sqlite`),
        the statements on its cursor through a `Session` as on PostgreSQL: SQLAlchemy's `Connection`
        and transaction around them cost more CPU than SQLite's own work (docs/performance.md,
        "Eighth round")."""
        self._session = session = Session(self._engine, self._checkout(), "", self._open_connection)
        begin_sqlite(session.pooled, immediate=self._write)
        self._sqlite = session.pooled.dbapi_connection

    def _start_on_driver(self, budget: int | None) -> None:
        """PostgreSQL: a pooled DBAPI connection, its transaction begun by the first statement."""
        pooled = self._checkout()
        prefixes: list[str] = []
        controlled = self._take_transaction_control(pooled.dbapi_connection)
        if controlled and not self._single_statement:
            prefixes.append("BEGIN")
        if budget is not None:
            prefixes.append(f"SET LOCAL statement_timeout = {max(budget, 1)}")
        # Held before anything else can fail: `_close` returns the connection to the pool.
        self._session = session = Session(self._engine, pooled, "; ".join(prefixes), self._open_connection)
        if not controlled:
            session.sqlalchemy()  # psycopg2 keeps control: SQLAlchemy's transaction commits

    def _open_connection(self, session: Session) -> Connection:
        """SQLAlchemy's `Connection` on the session's pooled connection, in its transaction: with
        the driver in autocommit SQLAlchemy's begin sends nothing, and its commit or rollback after
        ours sends nothing either; the prefix, if no statement took it yet, goes with its first."""
        connection = Connection(self._engine, connection=session.pooled)
        self._connection = connection
        self._transaction = connection.begin()
        prefix = session.take_prefix()
        if prefix:
            # With the first statement of the transaction, not round trips of their own.
            prefix_next_statement(connection, prefix)
        return connection

    def _take_transaction_control(self, dbapi: Any) -> bool:
        """On PostgreSQL the unit of work, not psycopg2, sends BEGIN: in front of the first
        statement, in the same query string. psycopg2 sends it as a round trip of its own, one of
        the three of a one-statement transaction. The driver is put in autocommit (client-side in
        psycopg2) so that it sends no BEGIN; `commit` and `__exit__` send COMMIT and ROLLBACK, and
        the connection goes back to the pool with autocommit off and no transaction open, or is
        discarded (`_close`). A single-statement read sends no BEGIN at all: the statement is a
        transaction of its own (with its statement-timeout prefix, sent in the same query string,
        it runs in one implicit transaction). False (psycopg2 keeps control) if the connection is
        not idle, which a checkout never leaves it."""
        if dbapi is None or dbapi.autocommit or dbapi.status != STATUS_READY:
            return False
        dbapi.autocommit = True
        self._autocommitting = dbapi
        return True

    def _open_on_driver(self) -> bool:
        """Whether a transaction whose end this unit of work sends is open on the driver's
        connection (on PostgreSQL IDLE means nothing ran yet, or a single statement did)."""
        if self._sqlite is not None:
            return bool(self._sqlite.in_transaction)
        dbapi = self._autocommitting
        return dbapi is not None and dbapi.info.transaction_status != TRANSACTION_STATUS_IDLE

    def _end_transaction(self, command: str) -> None:
        """COMMIT or ROLLBACK on the driver's own cursor, as psycopg2's commit() and rollback() send
        them (SQLAlchemy's execution around a statement costs more CPU than the round trip); its
        errors reach the caller wrapped as SQLAlchemy's would be, for `translate`."""
        if self._sqlite is not None:
            sqlite_command(self._sqlite, command)
            return
        cursor = self._autocommitting.cursor()
        try:
            cursor.execute(command)
        except psycopg2.Error as error:
            raise sa_exc.DBAPIError.instance(command, None, error, psycopg2.Error) from error
        finally:
            cursor.close()

    def _pass_gate(self, budget_ms: int | None) -> None:
        """On SQLite, wait for this process's other writers (db.engine.WriterGate)."""
        gate = writer_gate(self._engine)
        if gate is None:
            return
        wait_s = gate.timeout_s if budget_ms is None else min(gate.timeout_s, budget_ms / 1000)
        if not gate.acquire(max(wait_s, 0.0)):
            if budget_ms is not None:
                raise waited_past_deadline()
            raise UnavailableError("database is busy: other writers held it too long")
        self._gate = gate

    def _started(self) -> None:
        """Hook for subclasses to build repositories on the connection."""

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the transaction has committed (never if it rolls back)."""
        self._after_commit.append(callback)

    def commit(self) -> None:
        if self._session is None:
            raise RuntimeError("unit of work used outside its `with` block")
        dbapi = self._autocommitting
        if dbapi is not None and dbapi.info.transaction_status == TRANSACTION_STATUS_INERROR:
            # COMMIT would answer with a rollback, and psycopg2 would not raise.
            raise RuntimeError("commit after a failed statement: the transaction is rolled back")
        if self._open_on_driver():
            self._end_transaction("COMMIT")
        if self._transaction is not None:
            self._transaction.commit()
        self._committed = True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if not self._committed and self._session is not None:
                if self._open_on_driver():
                    self._end_transaction("ROLLBACK")
                if self._transaction is not None and self._transaction.is_active:
                    self._transaction.rollback()
        except Exception:
            pass
        finally:
            self._close()
        if exc is not None:
            domain_error = translate(exc, deadline_set=deadline.is_bound())
            if domain_error is not None:
                raise domain_error from exc
        if self._committed:
            for callback in self._after_commit:
                callback()

    def _close(self) -> None:
        """Back to the pool (SQLAlchemy's `Connection`, if one was opened, returns it), or, if the
        transaction could not be ended, discarded."""
        session = self._session
        pooled = session.pooled if session is not None else None
        try:
            if self._autocommitting is not None:
                dbapi, self._autocommitting = self._autocommitting, None
                try:
                    if dbapi.info.transaction_status != TRANSACTION_STATUS_IDLE:
                        raise RuntimeError("a transaction is still open")
                    dbapi.autocommit = False
                except Exception:  # broken, or still in a transaction: never back into the pool
                    if self._connection is not None:
                        self._connection.invalidate()
                    elif pooled is not None:
                        pooled.invalidate()  # and so returned to the pool, as discarded
                        pooled = None
            if self._sqlite is not None:
                sqlite3_connection, self._sqlite = self._sqlite, None
                if sqlite3_connection.in_transaction:  # ROLLBACK failed: never back into the pool
                    if self._connection is not None:
                        self._connection.invalidate()
                    elif pooled is not None:
                        pooled.invalidate()
                        pooled = None
            if self._connection is not None:
                self._connection.close()
            elif pooled is not None:
                pooled.close()
        finally:
            self._session = self._connection = None
            self._transaction = None
            if self._gate is not None:
                self._gate.release()
                self._gate = None


class OrdersUnitOfWork(UnitOfWork):
    """A transaction on the orders database: orders, their items and the outbox."""

    orders: OrderRepository
    outbox: OutboxStore

    def _started(self) -> None:
        self.orders = OrderRepository(self.session)
        self.outbox = OutboxStore(self.session, on_stored=self._events_stored)

    def _events_stored(self, rows: Sequence[Mapping[str, Any]], now: datetime) -> None:
        """Hook: this transaction stored the outbox rows `rows` (`OutboxStore.new_rows`), by the
        outbox store or with their order (`add_order`); `db.recording` records what they carry."""

    def add_order(
        self,
        order: Order,
        request_fingerprint: str | None,
        events: Sequence[DomainEvent],
        correlation_id: str | None,
        lease: Lease | None = None,
    ) -> list[ClaimedEvent]:
        """A new order, its items and its events: on PostgreSQL one statement (the order and item
        inserts ride along as data-modifying CTEs of the outbox insert), on SQLite three
        (`db.chained.insert_together`). Placing an order is the hottest write; two round trips
        fewer is a third of its transaction.

        With a `lease` (one event: the statement returns one key), the event is stored leased to
        this process and returned as claimed, for the local dispatcher to run without a claim."""
        if lease is not None and len(events) != 1:
            raise ValueError("an order placed under a lease has exactly one event")
        rows = OutboxStore.new_rows(events, correlation_id, order.create_time, lease, self.dialect)
        parts = [*OrderRepository.new_rows(order, request_fingerprint), (outbox_events, rows)]
        ids = insert_together(self.session, parts, returning=lease is not None)
        self._events_stored(rows, order.create_time)
        return [] if lease is None else OutboxStore.leased(rows, ids, lease, order.create_time)

    def settle_and_complete(
        self, order_id: str, settlement: Settlement, event: ClaimedEvent, now: datetime
    ) -> tuple[bool, bool]:
        """Settle a PENDING order (`OrderRepository.settle_pending`) and mark its event DONE, fenced
        on the lease (`OutboxStore.complete`): (settled, completed). The event is completed only
        if the order settled. On PostgreSQL one statement (the settle is a CTE of the completion),
        on SQLite two. The caller commits only (True, True)."""
        if not backend_of(self.dialect).one_statement_writes:
            settled = self.orders.settle_pending(order_id, settlement, now)
            return settled, settled and self.outbox.complete(event, now)
        parameters = OrderRepository.settle_parameters(order_id, settlement, now)
        parameters.update(event_id=event.id, token=event.lease_token)
        statement = settle_and_complete_statement()
        row = precompiled.execute(self.session, statement, parameters, prepare=True).one()
        return bool(row.settled), bool(row.completed)

    def settle_and_complete_many(
        self, settlements: Sequence[tuple[Settlement, ClaimedEvent]], now: datetime
    ) -> dict[int, tuple[bool, bool]]:
        """`settle_and_complete` for a batch of events, each settling its own order (the event's
        aggregate), on PostgreSQL in one statement (`db.settlement`), on SQLite in a few
        (`_settle_and_complete_in_turn`): per event id,
        (leased, settled). An event whose lease this process no longer holds settles nothing and
        is not completed; one whose order was not PENDING is not completed either; every other
        order is settled and its event completed, fenced on its own lease token. The caller
        commits whatever the answers (nothing written is left to roll back)."""
        if not backend_of(self.dialect).one_statement_writes:
            return self._settle_and_complete_in_turn(settlements, now)
        parameters: dict[str, Any] = {
            "s_orders": [event.aggregate_id for _, event in settlements],
            "s_targets": [settlement.status.value for settlement, _ in settlements],
            "s_reasons": [settlement.reason for settlement, _ in settlements],
            "s_events": [event.id for _, event in settlements],
            "s_tokens": [event.lease_token for _, event in settlements],
            "now": now,
        }
        statement = settle_and_complete_many_statement()
        row = precompiled.execute(self.session, statement, parameters, prepare=True).one()
        leased, settled, completed = set(row.leased or ()), set(row.settled or ()), set(row.completed or ())
        answers = {}
        for _, event in settlements:
            settles = event.aggregate_id in settled
            if settles and event.id not in completed:  # the leases were locked: only a bug gets here
                raise RuntimeError(f"event {event.id}: its order settled without its completion")
            answers[event.id] = (event.id in leased, settles)
        return answers

    def _settle_and_complete_in_turn(
        self, settlements: Sequence[tuple[Settlement, ClaimedEvent]], now: datetime
    ) -> dict[int, tuple[bool, bool]]:
        """`settle_and_complete_many` on SQLite, whose writer holds the whole database from its
        BEGIN IMMEDIATE, so no lease changes hands between its statements: the events whose lease
        still holds (one read), their orders settled (a statement per settlement: VALIDATED, or
        FAILED for one reason), then the events of the orders that settled completed together."""
        held = self.outbox.held([event for _, event in settlements])
        alike: dict[Settlement, list[str]] = {}
        for settlement, event in settlements:
            if event.id in held:
                alike.setdefault(settlement, []).append(event.aggregate_id)
        moved: set[str] = set()
        for settlement, order_ids in alike.items():
            moved |= self.orders.settle_pending_many(order_ids, settlement, now)
        settled = [event for _, event in settlements if event.id in held and event.aggregate_id in moved]
        completed = self.outbox.complete_many(settled, now)
        if len(completed) != len(settled):  # the database was this writer's: only a bug gets here
            raise RuntimeError(f"{len(settled) - len(completed)} orders settled without their completion")
        return {event.id: (event.id in held, event.id in completed) for _, event in settlements}


OrdersUowFactory = Callable[..., OrdersUnitOfWork]
