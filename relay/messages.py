"""A relay event as the NATS message that carries it: the subject `<prefix>.<kind>`, the body an
`orders.v1.OrderEvent` (protos/orders/v1/events.proto) and the headers.

Headers: `Nats-Msg-Id` is the event id, `<order_id>:<version>`, so that JetStream keeps one
message per event within its duplicate window however often the relay publishes it;
`x-correlation-id` is the correlation id of the source event (the call that caused the change, or
the saga step that settled it), and `traceparent`, `tracestate` and `baggage` are copied from the
source event's headers when it has them (W3C trace context); `Content-Type` names the message type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from orders_service_api.v1 import events_pb2, orders_pb2

from db.outbox import ClaimedEvent

MSG_ID = "Nats-Msg-Id"
CORRELATION_ID = "x-correlation-id"
CONTENT_TYPE = "application/protobuf; proto=orders.v1.OrderEvent"
# Trace context headers (W3C Trace Context and Baggage), copied as they are when the source event
# carries them.
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


class MalformedEventError(Exception):
    """A queued row that cannot be made into a message: retried, then DEAD for an operator."""


@dataclass(frozen=True)
class Message:
    subject: str
    data: bytes
    headers: dict[str, str]

    @property
    def event_id(self) -> str:
        return self.headers[MSG_ID]


def event_id(order_id: str, version: int) -> str:
    """The id of an order's change to `version`: unique per event, and its `Nats-Msg-Id`."""
    return f"{order_id}:{version}"


def subject(prefix: str, kind: str) -> str:
    return f"{prefix}.{kind}"


def message(event: ClaimedEvent, prefix: str) -> Message:
    """The message of a claimed relay event (its payload is `db.relay.payload_of`'s JSON)."""
    try:
        fields = json.loads(event.payload)
        body = order_event(event.event_type, fields)
    except (ValueError, KeyError, TypeError) as error:
        raise MalformedEventError(f"relay event {event.id} cannot be published: {error}") from error
    headers = {MSG_ID: body.event_id, "Content-Type": CONTENT_TYPE}
    correlation = event.headers.get("correlation_id")
    if correlation:
        headers[CORRELATION_ID] = correlation
    for name in TRACE_HEADERS:
        if event.headers.get(name):
            headers[name] = event.headers[name]
    return Message(subject(prefix, event.event_type), body.SerializeToString(), headers)


def order_event(kind: str, fields: dict[str, Any]) -> events_pb2.OrderEvent:
    """The `OrderEvent` of a change of `kind` (placed, validated, ...) from the queued row's fields."""
    occurred = Timestamp()
    occurred.FromDatetime(datetime.fromisoformat(fields["occur_time"]))
    body = events_pb2.OrderEvent(
        event_id=event_id(fields["order_id"], int(fields["version"])),
        order_id=fields["order_id"],
        version=int(fields["version"]),
        status=orders_pb2.OrderStatus.Value("ORDER_STATUS_" + fields["status"]),
        occur_time=occurred,
        customer_id=fields["customer_id"],
    )
    reason = fields.get("failure_reason", "")
    if kind == "placed":
        items = [orders_pb2.OrderItem(sku=i["sku"], quantity=int(i["quantity"])) for i in fields["items"]]
        body.placed.CopyFrom(events_pb2.OrderPlaced(items=items))
    elif kind == "validated":
        body.validated.SetInParent()
    elif kind == "failed":
        body.failed.CopyFrom(events_pb2.OrderFailed(failure_reason=reason))
    elif kind == "cancelled":
        body.cancelled.SetInParent()
    elif kind == "expired":
        body.expired.CopyFrom(events_pb2.OrderExpired(failure_reason=reason))
    else:
        raise KeyError(f"unknown kind of change {kind!r}")
    return body
