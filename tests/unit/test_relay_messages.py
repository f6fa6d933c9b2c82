"""A queued change as the NATS message the relay publishes: subject, OrderEvent body, headers."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from orders_service_api.v1 import orders_pb2 as pb

from db.outbox import ClaimedEvent
from relay.messages import MalformedEventError, message

NOW = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
ORDER = "3f0c2b8e-0000-4000-8000-000000000001"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def queued(kind: str, headers: dict[str, str], **fields: object) -> ClaimedEvent:
    payload = {
        "order_id": ORDER,
        "version": 2,
        "customer_id": "alice",
        "status": "FAILED",
        "failure_reason": "",
        "occur_time": NOW.isoformat(),
        **fields,
    }
    return ClaimedEvent(7, ORDER, kind, json.dumps(payload), headers, 1, NOW, "token", NOW)


def test_a_placed_order_becomes_an_order_event_on_its_subject():
    event = queued(
        "placed", {"correlation_id": "c-1"}, version=1, status="PENDING", items=[{"sku": "A", "quantity": 2}]
    )

    sent = message(event, "orders.v1")

    assert sent.subject == "orders.v1.placed"
    assert sent.headers["Nats-Msg-Id"] == sent.event_id == f"{ORDER}:1"
    assert sent.headers["x-correlation-id"] == "c-1"
    body = pb_event(sent.data)
    assert body.WhichOneof("change") == "placed"
    assert [(item.sku, item.quantity) for item in body.placed.items] == [("A", 2)]
    assert (body.order_id, body.version, body.customer_id) == (ORDER, 1, "alice")
    assert body.status == pb.ORDER_STATUS_PENDING
    assert body.occur_time.ToDatetime(tzinfo=UTC) == NOW


@pytest.mark.parametrize(
    ("kind", "status", "reason", "oneof"),
    [
        ("validated", "VALIDATED", "", "validated"),
        ("failed", "FAILED", "insufficient stock", "failed"),
        ("cancelled", "CANCELLED", "", "cancelled"),
        ("expired", "FAILED", "saga timed out", "expired"),
    ],
)
def test_each_kind_sets_its_own_change(kind, status, reason, oneof):
    body = pb_event(message(queued(kind, {}, status=status, failure_reason=reason), "p").data)

    assert body.WhichOneof("change") == oneof
    assert pb.OrderStatus.Name(body.status) == f"ORDER_STATUS_{status}"
    if reason:
        assert getattr(body, oneof).failure_reason == reason


def test_the_trace_context_of_the_source_event_travels_in_the_headers():
    headers = {"correlation_id": "c-2", "traceparent": TRACEPARENT, "tracestate": "vendor=1", "other": "x"}

    sent = message(queued("validated", headers, status="VALIDATED"), "orders.v1")

    assert sent.headers["traceparent"] == TRACEPARENT
    assert sent.headers["tracestate"] == "vendor=1"
    assert "other" not in sent.headers
    assert "correlation_id" not in sent.headers  # it travels as x-correlation-id


def test_an_event_without_correlation_id_has_no_such_header():
    assert (
        "x-correlation-id" not in message(queued("expired", {}, failure_reason="saga timed out"), "p").headers
    )


def test_a_row_that_cannot_be_a_message_is_malformed():
    with pytest.raises(MalformedEventError):
        message(queued("placed", {}, status="PENDING"), "p")  # a placed event without items
    with pytest.raises(MalformedEventError):
        message(queued("refunded", {}, status="FAILED"), "p")


def pb_event(data: bytes):
    from orders_service_api.v1 import events_pb2

    return events_pb2.OrderEvent.FromString(data)
