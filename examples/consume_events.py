"""A consumer of the orders service's events (NATS JetStream), small enough to copy.

    python examples/consume_events.py --url nats://127.0.0.1:4222 --stream ORDERS --durable billing

It reads the stream through a durable pull consumer (a restart goes on where the last run
stopped), decodes each message as an `orders.v1.OrderEvent`, handles it and acknowledges it. One
line per event handled:

    orders.v1.validated 6f0e3c2a-...:2 VALIDATED correlation=python-client-1

De-duplication: the service publishes each event with `Nats-Msg-Id` = its event id, so JetStream
stores it once however often the service publishes it within the stream's duplicate window. A
consumer still sees a message again when its acknowledgement is lost (a redelivery), and could see
a duplicate published after the window; so it keeps, per order, the highest version it has
handled, and skips any event of that order at or below it. A real consumer keeps that number in
its own database, in the same transaction as the effect of the event. Per order the service
publishes in version order, so a version above the next one expected never comes first.

Needs only nats-py and the client package orders-service-api (`pip install nats-py ./generated`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from orders_service_api.v1 import events_pb2, orders_pb2


async def consume(url: str, stream: str, durable: str, subjects: str, count: int, idle_s: float) -> int:
    """Handle events until `count` are handled (0: no limit) or none came for `idle_s` seconds;
    the number handled."""
    nc = await nats.connect(url)
    last_version: dict[str, int] = {}  # order id -> highest version handled (keep it in your database)
    handled = 0
    try:
        js = nc.jetstream()
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=subjects,
            max_ack_pending=1,  # one at a time: a consumer that handles in parallel loses the order
        )
        subscription = await js.pull_subscribe(subjects, durable=durable, stream=stream, config=config)
        while count == 0 or handled < count:
            try:
                messages = await subscription.fetch(1, timeout=idle_s)
            except nats.errors.TimeoutError:
                break
            for message in messages:
                event = events_pb2.OrderEvent.FromString(message.data)
                if event.version <= last_version.get(event.order_id, 0):
                    await message.ack()  # seen already: a redelivery or a late duplicate
                    continue
                handle(message.subject, event, dict(message.headers or {}))
                last_version[event.order_id] = event.version
                await message.ack()
                handled += 1
    finally:
        await nc.close()
    return handled


def handle(subject: str, event: events_pb2.OrderEvent, headers: dict[str, str]) -> None:
    """The consumer's own work; here, one line per event."""
    status = orders_pb2.OrderStatus.Name(event.status).removeprefix("ORDER_STATUS_")
    correlation = headers.get("x-correlation-id", "-")
    print(f"{subject} {event.event_id} {status} correlation={correlation}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222", help="NATS server")
    parser.add_argument("--stream", default="ORDERS", help="the service's --events-stream")
    parser.add_argument(
        "--durable", default="orders-example", help="name of this consumer (kept by JetStream)"
    )
    parser.add_argument("--subjects", default="orders.v1.>", help="which events: <prefix>.> for all of them")
    parser.add_argument("--count", type=int, default=0, help="stop after this many events (0: no limit)")
    parser.add_argument("--idle-s", type=float, default=5.0, help="stop when no event came for this long")
    args = parser.parse_args()
    handled = asyncio.run(
        consume(args.url, args.stream, args.durable, args.subjects, args.count, args.idle_s)
    )
    print(f"handled {handled} events", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
