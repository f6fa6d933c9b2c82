"""A broker outage, with NATS behind a TCP proxy that the test cuts (tests/tcp_proxy.py; the shared
nats-server itself keeps running): PlaceOrder and the saga go on at their usual pace, the relay
defers through its breaker without spending an attempt, nothing is buried, and once the proxy
forwards again the backlog drains, every order's events once and in order. The drain time is
printed (`-s` shows it) and bounded."""

from __future__ import annotations

import time

import pytest
from orders_service_api.v1 import orders_pb2 as pb
from sqlalchemy import func, select

from db.engine import make_engine
from db.tables import relay_events
from tests.events_support import by_order
from tests.support import wait_until
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("nats_url")]

ORDERS = 40


def relay_rows(url: str) -> dict[str, object]:
    """PENDING and DEAD rows, and the most attempts a PENDING row that no relay holds has used."""
    engine = make_engine(url)
    try:
        with engine.connect() as c:
            pending = c.execute(
                select(func.count()).select_from(relay_events).where(relay_events.c.status == "PENDING")
            ).scalar_one()
            dead = c.execute(
                select(func.count()).select_from(relay_events).where(relay_events.c.status == "DEAD")
            ).scalar_one()
            spent = c.execute(
                select(func.coalesce(func.max(relay_events.c.attempts), 0)).where(
                    relay_events.c.status == "PENDING", relay_events.c.locked_until.is_(None)
                )
            ).scalar_one()
    finally:
        engine.dispose()
    return {"pending": pending, "dead": dead, "spent": spent}


def test_a_broker_outage_defers_without_spending_attempts_and_the_backlog_drains(
    make_pg_database, start_server, event_stream, nats_url
):
    url = make_pg_database()
    with TcpProxy(("127.0.0.1", 4222), lifetime_s=120) as proxy:
        server = start_server(
            database_url=url,
            events_url=f"nats://127.0.0.1:{proxy.port}",
            events_stream=event_stream.name,
            events_subject_prefix=event_stream.prefix,
            events_publish_timeout_s=1.0,
            breaker_fail_max=3,
            breaker_reset_s=1.0,
        )
        relay = server.service.relay
        assert relay is not None and relay.dispatcher is not None and relay.guard is not None
        stubs = server.stubs
        stubs.set_stock("WIDGET", 10_000)
        first = stubs.place("before", [("WIDGET", 1)]).order_id
        event_stream.wait_for(2)  # placed and validated went through the proxy

        proxy.cut()
        latencies, placed = [], []
        for n in range(ORDERS):
            began = time.monotonic()
            placed.append(stubs.place(f"customer-{n}", [("WIDGET", 1)]).order_id)
            latencies.append(time.monotonic() - began)
        wait_until(
            lambda: all(stubs.get(order_id).status == pb.ORDER_STATUS_VALIDATED for order_id in placed),
            timeout=30,
            what="the saga to validate every order during the outage",
        )
        wait_until(
            lambda: relay.guard.breaker.current_state == "open", timeout=20, what="the events breaker open"
        )
        deferred_before = relay.dispatcher.stats.deferred
        wait_until(
            lambda: relay.dispatcher.stats.deferred > deferred_before + 5, timeout=20, what="deferrals"
        )

        during = relay_rows(url)
        assert during["pending"] == 2 * ORDERS  # placed and validated of every order, none published
        assert during["dead"] == 0
        assert during["spent"] == 0, "a deferral gives back the attempt its claim counted"
        assert relay.dispatcher.stats.retried == relay.dispatcher.stats.dead == 0
        assert max(latencies) < 1.0, f"PlaceOrder waited on the broker: {max(latencies):.3f}s"

        proxy.restore()
        restored = time.monotonic()
        messages = event_stream.wait_for(2 + 2 * ORDERS, timeout=60)
        drained_s = time.monotonic() - restored
        print(f"\nbacklog of {2 * ORDERS} events drained {drained_s:.2f}s after the broker came back")

    orders = by_order(messages)
    assert len(messages) == 2 + 2 * ORDERS
    for order_id in [first, *placed]:
        assert [(m.kind, m.event.version) for m in orders[order_id]] == [("placed", 1), ("validated", 2)]
    assert relay_rows(url)["pending"] == 0
    # The breaker waits out its reset (1 s) before a probe; nats-py reconnects every 0.5 s.
    assert drained_s < 15
