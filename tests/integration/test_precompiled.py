"""Statements run from SQL compiled once (db.precompiled) reach the driver exactly as
`connection.execute` would send them: the same SQL, the same processed parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event

from db import clock, precompiled
from db.chained import statement_for
from db.engine import make_engine
from db.inventory import _apply_allocation, _earlier_reservations, _fence_many, _locked_levels, _reserve_all
from db.orders import OrderRepository
from db.outbox import OUTBOX, Lease, OutboxStore
from db.queue import claim_statement, complete_and_claim_statement, complete_many_statement, renew_statement
from db.settlement import settle_and_complete_many_statement, settle_and_complete_statement
from db.tables import order_items, orders, outbox_events
from domain.model import Order, OrderItem, Settlement, utcnow
from tests.support import apply_schema

pytestmark = pytest.mark.postgres


@pytest.fixture
def engine(make_pg_database: Callable[[], str]) -> Iterator[Engine]:
    engine = make_engine(apply_schema(make_pg_database()))
    yield engine
    engine.dispose()


def _sent(engine: Engine, run: Callable[[Connection], object]) -> tuple[str, dict[str, Any]]:
    """What reached the driver when `run` executed one statement (rolled back afterwards)."""
    seen: list[tuple[str, dict[str, Any]]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, dict(parameters)))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with engine.connect() as connection, connection.begin() as transaction:
            run(connection)
            transaction.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    (sent,) = seen
    return sent


def _same_either_way(engine: Engine, statement: Any, parameters: Mapping[str, Any]) -> None:
    usual_sql, usual = _sent(engine, lambda c: c.execute(statement, dict(parameters)))
    once_sql, once = _sent(engine, lambda c: precompiled.execute(c, statement, parameters))
    assert once_sql == usual_sql
    # Parameters the SQL does not name may ride along (the driver ignores them; `db.clock` gives
    # both databases' parameters): what it names must be the same.
    assert {name: once.get(name) for name in usual} == usual


def test_the_claim_goes_out_as_sqlalchemy_would_send_it(engine: Engine) -> None:
    parameters = {"limit": 8, "token": "t-1", **clock.parameters(utcnow(), lease_s=30.0)}
    _same_either_way(engine, claim_statement(OUTBOX, "postgresql"), parameters)


def test_a_lease_renewal_goes_out_as_sqlalchemy_would_send_it(engine: Engine) -> None:
    parameters = {"ids": [1, 2], "tokens": ["t-1"], **clock.parameters(utcnow(), lease_s=30.0)}
    _same_either_way(engine, renew_statement(OUTBOX, "postgresql"), parameters)


def test_the_batch_completion_goes_out_as_sqlalchemy_would_send_it(engine: Engine) -> None:
    parameters = {"now": utcnow(), "ids": [1, 2, 3], "tokens": ["t-1", "t-2"]}
    _same_either_way(engine, complete_many_statement(OUTBOX, "postgresql"), parameters)


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


def test_the_reservation_goes_out_as_sqlalchemy_would_send_it(engine: Engine) -> None:
    parameters = {"order_id": "o-1", "skus": ["SKU-1", "SKU-2"], "quantities": [2, 1], "now": utcnow()}
    _same_either_way(engine, _reserve_all(), parameters)
    _same_either_way(engine, _reserve_all(fenced=True), {**parameters, "fence_event": 7, "fence_claim": 2})


def test_the_settle_and_completion_go_out_as_sqlalchemy_would_send_them(engine: Engine) -> None:
    parameters = OrderRepository.settle_parameters("o-1", Settlement.validated(), utcnow())
    parameters.update(event_id=7, token="t-1")
    _same_either_way(engine, settle_and_complete_statement(), parameters)


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


def test_the_completion_with_a_claim_goes_out_as_sqlalchemy_would_send_it(engine: Engine) -> None:
    parameters = {
        "ids": [1, 2],
        "tokens": ["t-1"],
        "limit": 8,
        "token": "t-2",
        **clock.parameters(utcnow(), lease_s=30.0),
    }
    _same_either_way(engine, complete_and_claim_statement(OUTBOX), parameters)


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
