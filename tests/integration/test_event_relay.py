"""The event relay against the local NATS JetStream, on both backends: with `--events-url` every
change of an order reaches the stream as an `orders.v1.OrderEvent` on `<prefix>.<kind>`, once, in
the order it happened, with the caller's correlation id and the event id as `Nats-Msg-Id`; without
it nothing is recorded at all."""

from __future__ import annotations

import pytest
from orders_service_api.v1 import orders_pb2 as pb
from sqlalchemy import func, select

from db.engine import make_engine
from db.tables import relay_events
from tests.events_support import by_order
from tests.support import wait_until

pytestmark = pytest.mark.usefixtures("nats_url")


def place(stubs, customer: str, items, correlation_id: str) -> str:
    request = pb.PlaceOrderRequest(
        customer_id=customer, items=[pb.OrderItem(sku=s, quantity=q) for s, q in items]
    )
    response = stubs.orders.PlaceOrder(request, timeout=10, metadata=[("x-correlation-id", correlation_id)])
    return str(response.order.order_id)


def wait_status(stubs, order_id: str, status: int) -> None:
    wait_until(lambda: stubs.get(order_id).status == status, timeout=20, what=f"order {order_id} settled")


def relay_rows(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(relay_events)).scalar_one())
    finally:
        engine.dispose()


def test_every_change_of_an_order_is_published_once_in_order(database_url, start_server, event_stream):
    server = start_server(database_url=database_url, **event_stream.settings())
    stubs = server.stubs
    stubs.set_stock("WIDGET", 5)
    validated = place(stubs, "alice", [("WIDGET", 2)], "corr-validated")
    failed = place(stubs, "bob", [("NO-SUCH-SKU", 1)], "corr-failed")
    wait_status(stubs, validated, pb.ORDER_STATUS_VALIDATED)
    wait_status(stubs, failed, pb.ORDER_STATUS_FAILED)
    stubs.orders.CancelOrder(
        pb.CancelOrderRequest(order_id=validated), timeout=10, metadata=[("x-correlation-id", "corr-cancel")]
    )

    orders = by_order(event_stream.wait_for(5))
    assert [(m.kind, m.event.version) for m in orders[validated]] == [
        ("placed", 1),
        ("validated", 2),
        ("cancelled", 3),
    ]
    assert [(m.kind, m.event.version) for m in orders[failed]] == [("placed", 1), ("failed", 2)]

    placed, _validated, cancelled = orders[validated]
    assert placed.subject == f"{event_stream.prefix}.placed"
    assert placed.event.WhichOneof("change") == "placed"
    assert [(i.sku, i.quantity) for i in placed.event.placed.items] == [("WIDGET", 2)]
    assert placed.event.customer_id == "alice"
    assert placed.event.status == pb.ORDER_STATUS_PENDING
    assert placed.headers["Nats-Msg-Id"] == placed.event.event_id == f"{validated}:1"
    # The saga's step carries the correlation id of the PlaceOrder call that started it.
    assert [m.headers["x-correlation-id"] for m in orders[validated]] == [
        "corr-validated",
        "corr-validated",
        "corr-cancel",
    ]
    assert cancelled.event.status == pb.ORDER_STATUS_CANCELLED
    failure = orders[failed][1].event
    assert failure.failed.failure_reason == "unknown SKU 'NO-SUCH-SKU'"
    assert failure.status == pb.ORDER_STATUS_FAILED
    assert failure.occur_time.ToDatetime() >= orders[failed][0].event.occur_time.ToDatetime()


def test_an_order_the_saga_does_not_settle_in_time_is_published_expired(
    database_url, start_server, event_stream
):
    server = start_server(
        database_url=database_url,
        saga_workers=0,  # nobody settles: the sweep expires it
        saga_timeout_s=0.5,
        housekeeping_interval_s=0.2,
        **event_stream.settings(),
    )
    order_id = place(server.stubs, "carol", [("WIDGET", 1)], "corr-expired")

    orders = by_order(event_stream.wait_for(2))
    placed, expired = orders[order_id]
    assert (placed.kind, expired.kind) == ("placed", "expired")
    assert expired.event.expired.failure_reason == "saga timed out"
    assert expired.event.version == 2
    assert "x-correlation-id" not in expired.headers  # the sweep acts for no caller


def test_without_events_url_nothing_is_recorded(database_url, start_server):
    server = start_server(database_url=database_url)
    stubs = server.stubs
    stubs.set_stock("WIDGET", 5)
    order_id = place(stubs, "dave", [("WIDGET", 1)], "corr-off")
    wait_status(stubs, order_id, pb.ORDER_STATUS_VALIDATED)
    stubs.orders.CancelOrder(pb.CancelOrderRequest(order_id=order_id), timeout=10)

    assert relay_rows(database_url) == 0
