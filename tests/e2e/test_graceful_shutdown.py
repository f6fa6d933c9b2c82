"""SIGTERM under load on PostgreSQL, as an orchestrator sends it (DESIGN.md, "Running it").

A real `orders-server` process on a migrated PostgreSQL database takes orders from several client
threads while a `WatchOrder` stream follows a PENDING order and a `Health/Watch` stream follows the
server's health. The fault file slows every inventory call by a second, so the saga has a backlog
and orders stay PENDING. On SIGTERM:

- health turns NOT_SERVING (the Health/Watch stream is told before the process exits);
- calls after that are refused with UNAVAILABLE (a call caught in the very millisecond of the stop
  is CANCELLED by grpcio, before any handler ran: it placed nothing);
- the WatchOrder stream ends cleanly (OK today: see `CLEAN_ENDINGS`);
- the process exits 0 within the grace period and a few seconds;
- every order a client got an OK for is in the database, and a new process on the same database
  settles every one of them within the lease and a few seconds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orders_service_api.v1 import orders_pb2 as pb
from sqlalchemy import Engine, create_engine, func, select

from db.tables import orders, outbox_events
from tests.invariants import check_invariants
from tests.support import (
    ServerProcess,
    Stubs,
    migrate_database,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

GRACE_S = 3.0
LEASE_S = 3.0
SKU = "SHUTDOWN-SKU"
INITIAL_STOCK = 1_000_000
CLIENT_THREADS = 4
# How a server-streaming call may end when the server goes away: normally (OK), the client's own
# cancel, or the server refusing to go on. Anything else (INTERNAL, UNKNOWN...) is a broken stream.
CLEAN_ENDINGS = {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
SETTLED = {"VALIDATED", "FAILED"}


@dataclass
class Call:
    started: float
    ended: float
    code: grpc.StatusCode
    request_id: str
    order_id: str = ""


@dataclass
class Load:
    """Client threads placing orders back to back, each call recorded with its outcome."""

    address: str
    stop: threading.Event = field(default_factory=threading.Event)
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, index: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stubs = Stubs(channel)
            n = 0
            while not self.stop.is_set():
                n += 1
                request_id = f"load-{index}-{n}"
                started = time.monotonic()
                try:
                    order = stubs.place(f"load-{index}", [(SKU, 1)], request_id=request_id)
                    call = Call(started, time.monotonic(), grpc.StatusCode.OK, request_id, order.order_id)
                except grpc.RpcError as error:
                    call = Call(started, time.monotonic(), error.code(), request_id)
                with self.lock:
                    self.calls.append(call)
                if call.code is not grpc.StatusCode.OK:
                    self.stop.wait(0.02)  # pace the refused calls; the server is going away

    def acknowledged(self) -> list[str]:
        with self.lock:
            return [c.order_id for c in self.calls if c.code is grpc.StatusCode.OK]

    def snapshot(self) -> list[Call]:
        with self.lock:
            return list(self.calls)


@contextmanager
def running(load: Load) -> Iterator[Load]:
    threads = [threading.Thread(target=load.run, args=(i,), daemon=True) for i in range(CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    try:
        yield load
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(10)


class StreamRecord:
    """What a server-streaming call delivered (with arrival times) and how it ended."""

    def __init__(self) -> None:
        self.messages: list[tuple[float, object]] = []
        self.ending: grpc.StatusCode | None = None
        self.ended_at: float | None = None
        self.details = ""

    def follow(self, stream: Iterator[object], read: Callable[[object], object]) -> None:
        try:
            for message in stream:
                self.messages.append((time.monotonic(), read(message)))
            self.ending = grpc.StatusCode.OK
        except grpc.RpcError as error:
            self.ending, self.details = error.code(), str(error.details())
        self.ended_at = time.monotonic()

    def values(self) -> list[object]:
        return [value for _, value in self.messages]


def in_background(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_sigterm_under_load_drains_and_loses_no_acknowledged_order(
    make_pg_database: Callable[[], str], spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    url = make_pg_database()
    migrate_database(url, tmp_path)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"inventory_delay_s": 1}))
    server = spawn_server(
        "--database-url",
        url,
        "--fault-file",
        str(faults),
        "--grace-period-s",
        str(GRACE_S),
        "--lease-s",
        str(LEASE_S),
        "--poll-interval-s",
        "0.2",
    )
    server.stubs.set_stock(SKU, INITIAL_STOCK)

    health_channel = grpc.insecure_channel(server.address)
    health = StreamRecord()
    health_stream = health_pb2_grpc.HealthStub(health_channel).Watch(
        health_pb2.HealthCheckRequest(service="")
    )
    health_thread = in_background(
        lambda: health.follow(
            health_stream,
            lambda m: health_pb2.HealthCheckResponse.ServingStatus.Name(m.status),  # type: ignore[attr-defined]
        )
    )
    wait_until(lambda: health.values()[-1:] == ["SERVING"], what="Health/Watch to say SERVING")

    with running(Load(server.address)) as load:
        # A backlog ahead of the watched order keeps it PENDING (1 s per saga step, 8 workers).
        wait_until(lambda: len(load.acknowledged()) >= 40, timeout=20, what="40 acknowledged orders")
        watched = server.stubs.place("watcher", [(SKU, 1)])
        watch = StreamRecord()
        watch_stream = server.stubs.orders.WatchOrder(pb.WatchOrderRequest(order_id=watched.order_id))
        watch_thread = in_background(
            lambda: watch.follow(watch_stream, lambda m: pb.OrderStatus.Name(m.order.status))  # type: ignore[attr-defined]
        )
        wait_until(lambda: watch.messages, what="the first WatchOrder message")

        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(GRACE_S + 5)
        exited = time.monotonic()
    watch_thread.join(5)
    health_thread.join(5)
    health_channel.close()

    assert code == 0, server.log()
    assert exited - signalled < GRACE_S + 3, f"exit took {exited - signalled:.1f}s"
    assert "orders-server stopped" in server.log()

    # Health: NOT_SERVING was published on the open Watch stream before the process went away.
    assert health.values()[-1] == "NOT_SERVING", health.messages
    assert all(t < exited for t, _ in health.messages)

    # Calls: some were refused once the server stopped, and after the first refusal nothing is
    # served. A call that reaches the server in the very millisecond it stops is CANCELLED by grpcio
    # before any handler runs (about one run in four): see the check of the database below.
    calls = load.snapshot()
    refused = [c for c in calls if c.code is grpc.StatusCode.UNAVAILABLE]
    assert refused, "no call was refused after SIGTERM"
    first_refusal = min(c.ended for c in refused)
    assert first_refusal >= signalled
    served_late = [c for c in calls if c.code is grpc.StatusCode.OK and c.started > first_refusal]
    assert not served_late, f"{len(served_late)} calls started after a refusal were served"
    assert {c.code for c in calls} <= {
        grpc.StatusCode.OK,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
    }
    cancelled = {c.request_id for c in calls if c.code is grpc.StatusCode.CANCELLED}

    # The WatchOrder stream of the PENDING order ended cleanly while the process stopped.
    assert watch.ending in CLEAN_ENDINGS, (watch.ending, watch.details)
    assert watch.ended_at is not None and watch.ended_at < exited
    assert watch.values() and set(watch.values()) == {"ORDER_STATUS_PENDING"}, watch.values()

    # No acknowledged order is lost: each one is in the database with its ORDER_CREATED event.
    acknowledged = set(load.acknowledged()) | {watched.order_id}
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            stored = set(connection.execute(select(orders.c.id)).scalars())
            with_event = set(
                connection.execute(
                    select(outbox_events.c.aggregate_id).where(outbox_events.c.event_type == "ORDER_CREATED")
                ).scalars()
            )
        assert acknowledged <= stored, f"acknowledged orders missing: {sorted(acknowledged - stored)[:5]}"
        assert acknowledged <= with_event
        with engine.connect() as connection:
            done_anyway = connection.execute(
                select(orders.c.request_id).where(orders.c.request_id.in_(cancelled))
            ).all()
        assert not done_anyway, f"calls answered CANCELLED placed orders: {done_anyway}"

        def unsettled() -> int:
            with engine.connect() as connection:
                return int(
                    connection.execute(
                        select(func.count())
                        .select_from(orders)
                        .where(orders.c.id.in_(acknowledged), orders.c.status.not_in(SETTLED))
                    ).scalar_one()
                )

        assert unsettled() > 0, "the first process settled everything: the restart checks nothing"

        # A new process on the same database (inventory back to normal) settles every one of them.
        successor = spawn_server("--database-url", url, "--lease-s", str(LEASE_S), "--poll-interval-s", "0.2")
        wait_until(
            lambda: unsettled() == 0,
            timeout=LEASE_S + 5,
            interval=0.1,
            what="every acknowledged order VALIDATED or FAILED after the restart",
        )
        assert successor.proc.poll() is None
        wait_until(lambda: _no_pending_events(engine), timeout=5, what="no PENDING outbox event")
    finally:
        engine.dispose()
    check_invariants(url, url, {SKU: INITIAL_STOCK})


def _no_pending_events(engine: Engine) -> bool:
    with engine.connect() as connection:
        return not connection.execute(
            select(func.count()).select_from(outbox_events).where(outbox_events.c.status == "PENDING")
        ).scalar_one()


def test_a_saga_step_outlasting_the_grace_is_left_to_its_lease_and_the_process_exits(
    make_pg_database: Callable[[], str], spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    url = make_pg_database()
    migrate_database(url, tmp_path)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"inventory_delay_s": 6}))
    grace_s = 1.0
    server = spawn_server(
        "--database-url",
        url,
        "--fault-file",
        str(faults),
        "--grace-period-s",
        str(grace_s),
        "--lease-s",
        str(LEASE_S),
        "--poll-interval-s",
        "0.2",
    )
    server.stubs.set_stock(SKU, 10)
    order = server.stubs.place("slow", [(SKU, 1)])
    engine = create_engine(url)
    try:

        def leased() -> bool:
            with engine.connect() as connection:
                return bool(
                    connection.execute(
                        select(func.count())
                        .select_from(outbox_events)
                        .where(
                            outbox_events.c.aggregate_id == order.order_id,
                            outbox_events.c.lease_token.is_not(None),
                        )
                    ).scalar_one()
                )

        wait_until(leased, what="the saga to claim the order's event")

        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(grace_s + 3)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {time.monotonic() - signalled:.1f}s after SIGTERM (grace {grace_s}s)")
        assert code == 0

        faults.write_text("{}")
        successor = spawn_server("--database-url", url, "--lease-s", str(LEASE_S), "--poll-interval-s", "0.2")
        wait_until(
            lambda: successor.stubs.get(order.order_id).status == pb.ORDER_STATUS_VALIDATED,
            timeout=LEASE_S + 5,
            what="the successor to validate the order once the lease expired",
        )
    finally:
        engine.dispose()
