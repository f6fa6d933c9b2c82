"""Poison events: a handler that crashes on a malformed event buries it DEAD after `max_attempts`,
keeps the error for an operator, and every other order keeps flowing."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from orders_service_api.v1 import orders_pb2 as pb

from db.unit_of_work import OrdersUnitOfWork
from domain.model import utcnow
from tests.integration.helpers import rows_of
from tests.integration.saga_support import stock_of, wait_for_status, wait_settled_and_check
from tests.support import wait_until

MAX_ATTEMPTS = 3

# (event type, payload, a piece of the error that must be kept)
POISON = [
    ("ORDER_CREATED", "not json", "payload is not an order event"),
    ("ORDER_CREATED", "{}", "payload is not an order event"),
    ("ORDER_CREATED", '{"order_id": 42}', "payload has no order_id"),
    ("ORDER_CANCELLED", "[1, 2, 3]", "payload is not an order event"),
    (
        "ORDER_CREATED",
        json.dumps({"order_id": "11111111-1111-4111-8111-111111111111"}),
        "payload has no items",
    ),
    ("ORDER_CREATED", json.dumps({"order_id": "o", "items": [{"sku": "SKU-A"}]}), "malformed items"),
    (
        "ORDER_CREATED",
        json.dumps(
            {"order_id": "11111111-1111-4111-8111-111111111111", "items": [{"sku": "SKU-A", "quantity": 1}]}
        ),
        "does not exist",
    ),
    ("ORDER_CANCELLED", json.dumps({"order_id": "22222222-2222-4222-8222-222222222222"}), "does not exist"),
    ("ORDER_SHIPPED", "{}", "no handler for event type"),
]


def add_poison(engine, event_type: str, payload: str) -> tuple[int, str]:
    """A raw outbox row of a fresh aggregate, as a buggy producer or a hand edit would leave it."""
    aggregate_id = str(uuid.uuid4())
    with OrdersUnitOfWork(engine) as uow:
        event_id = uow.outbox.add_raw(
            aggregate_id, event_type, payload, {"correlation_id": "poison"}, utcnow()
        )
        uow.commit()
    return event_id, aggregate_id


def test_poison_events_end_dead_with_their_error_while_other_orders_validate(database_url, start_server):
    server = start_server(
        database_url=database_url, max_attempts=MAX_ATTEMPTS, retry_base_s=0.02, retry_max_s=0.1
    )
    engine = server.service.engines.orders
    server.stubs.set_stock("SKU-A", 100)

    def place(i: int) -> pb.Order:
        return server.stubs.place(f"good-{i}", [("SKU-A", 1)])

    with ThreadPoolExecutor(4) as pool:
        orders_before = pool.map(place, range(10))
        poison = [(add_poison(engine, kind, payload), wanted) for kind, payload, wanted in POISON]
        server.service.dispatcher.wake()
        orders_after = pool.map(place, range(10, 20))
        placed = [*orders_before, *orders_after]

    for order in placed:
        assert wait_for_status(server.stubs, order.order_id).status == pb.ORDER_STATUS_VALIDATED
    rows = rows_of(server)

    def dead_events(aggregate_id: str) -> list[Any]:
        return [e for e in rows.events(aggregate_id) if e.status == "DEAD"]

    for (event_id, aggregate_id), wanted in poison:
        [event] = wait_until(
            partial(dead_events, aggregate_id), timeout=10, what=f"poison event {event_id} to be DEAD"
        )
        assert event.id == event_id
        assert event.attempts == MAX_ATTEMPTS
        assert wanted in event.last_error
        assert event.lease_token is None
    assert stock_of(server.stubs, "SKU-A") == (80, 20)
    summary = wait_settled_and_check(server, {"SKU-A": 100})
    assert summary.events_by_status == {"DONE": 20, "DEAD": len(POISON)}
    assert server.service.dispatcher.stats.dead == len(POISON)


def test_a_poison_event_does_not_hold_up_later_events_of_other_orders(database_url, start_server):
    """One slot of a single-worker saga goes to the poison event's retries; orders still settle."""
    server = start_server(
        database_url=database_url,
        saga_workers=1,
        max_attempts=MAX_ATTEMPTS,
        retry_base_s=0.02,
        retry_max_s=0.1,
    )
    server.stubs.set_stock("SKU-A", 3)
    event_id, aggregate_id = add_poison(server.service.engines.orders, "ORDER_CREATED", "not json")
    server.service.dispatcher.wake()

    placed = [server.stubs.place("after-poison", [("SKU-A", 1)]) for _ in range(5)]

    statuses = [wait_for_status(server.stubs, o.order_id).status for o in placed]
    assert statuses.count(pb.ORDER_STATUS_VALIDATED) == 3
    assert statuses.count(pb.ORDER_STATUS_FAILED) == 2
    summary = wait_settled_and_check(server, {"SKU-A": 3})
    assert summary.events_by_status == {"DONE": 5, "DEAD": 1}
    [dead] = rows_of(server).events(aggregate_id)
    assert (dead.id, dead.status, dead.attempts) == (event_id, "DEAD", MAX_ATTEMPTS)
