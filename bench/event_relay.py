"""The event relay's drain (issue 19): changes of orders already queued in `relay_events`, published
to a JetStream stream of the run's own by the relay's dispatcher, `in_flight` publishes at once,
each acknowledged (PubAck) before its event is DONE; events per second until all are DONE. It runs
beside the no-op drain of the outbox (bench/relay.py, `our_drain`) in the same run and database,
so the two read as a ratio: what publishing to a broker costs over claiming and completing alone.

Runs in a spawned process (bench.relay.in_processes): it imports the service's code, which the
bench's own process need not.
"""

from __future__ import annotations

import time
import uuid
from functools import partial
from typing import Any

from bench.relay import drain_row, insert_and_analyze, timed_drain

# The local NATS server with JetStream (as the tests use it).
NATS_URL = "nats://127.0.0.1:4222"


def insert_pending(url: str, events: int) -> None:
    """N PENDING `placed` changes, one order each (so the one-at-a-time rule per order holds none
    back)."""
    insert_and_analyze(
        url,
        """INSERT INTO relay_events (order_id, kind, version, customer_id, order_status,
             failure_reason, occurred_at, placed_items, headers, status, attempts, claims,
             available_at, created_at, updated_at)
           SELECT gen_random_uuid()::text, 'placed', 1, 'bench-customer', 'PENDING', '', now(),
             '[{"sku":"SKU-1","quantity":1}]', '{"correlation_id":"bench"}', 'PENDING', 0, 0,
             now(), now(), now()
           FROM generate_series(1, %s)""",
        events,
        "relay_events",
    )


def nats_drain(database_url: str, events: int, in_flight: int, nats_url: str = NATS_URL) -> dict[str, Any]:
    """Queue `events` changes, then time the relay's dispatcher publishing them all."""
    from db.engine import EngineSettings, make_engine
    from db.relay import RelayUnitOfWork
    from relay.handler import EventRelay
    from relay.publisher import JetStreamPublisher, StreamSettings
    from saga.dispatcher import DispatcherSettings, OutboxDispatcher
    from saga.signals import WakeUp
    from server.config import Settings
    from server.events import build_guard
    from tests.events_support import EventStream, nats_reachable

    problem = nats_reachable(nats_url)
    if problem is not None:
        return {"skipped": f"NATS at {nats_url} is not reachable: {problem}"}
    insert_pending(database_url, events)
    tag = uuid.uuid4().hex[:10]
    stream = EventStream(nats_url, f"BENCH_{tag}", f"bench{tag}.orders.v1")
    settings = Settings(events_url=nats_url, events_workers=in_flight)
    publisher = JetStreamPublisher(
        nats_url,
        StreamSettings(stream.name, (f"{stream.prefix}.>",), settings.events_duplicate_window_s, 3600.0),
        timeout_s=settings.events_publish_timeout_s,
    )
    engine = make_engine(database_url, EngineSettings(pool_size=in_flight + 2, max_overflow=0))
    dispatcher = OutboxDispatcher(
        partial(RelayUnitOfWork, engine),
        EventRelay(publisher.publish, build_guard(settings), stream.prefix).handlers(),
        DispatcherSettings(workers=in_flight, name="relay"),
        wake=WakeUp(),
    )
    publisher.start()
    try:
        deadline = time.monotonic() + 10
        while not publisher.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed = timed_drain(dispatcher, events)
        stored = stream.count()
    finally:
        publisher.close()
        engine.dispose()
        stream.delete()
    poll_s = DispatcherSettings().poll_interval_s
    note = f"publish + PubAck per event, JetStream file storage, poll interval {poll_s} s"
    row = drain_row(dispatcher.stats.done, elapsed, in_flight, note)
    row["stored_in_stream"] = stored
    row["deferred"] = dispatcher.stats.deferred
    return row
