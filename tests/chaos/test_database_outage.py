"""Never lose an order, part 3: the database goes away under load and comes back.

A real `orders-server` process reaches PostgreSQL through a TCP proxy (tests/tcp_proxy.py). Clients
place orders with a 2 s deadline while the proxy is cut for about five seconds: every open
connection drops and every reconnect is refused at once, as when the database server goes down.
API.md and DESIGN.md promise that then:

- health turns NOT_SERVING within a few seconds, and SERVING again soon after the database is back;
- calls fail fast with UNAVAILABLE (or DEADLINE_EXCEEDED), never hang past their deadline, on the
  client nor in the server's handler;
- the process stays up, and its dispatcher backs off (growing pauses, not a tight loop of warnings);
- every acknowledged order is kept and settles once the database is back, and the invariants hold.

The second test is the silent outage of a partition or a dead host (`TcpProxy.blackhole`: nothing
is closed, nothing answers), with the same promises for health and deadlines.

(That a deadline reaches the database, a query waiting on a row lock being cancelled when the
client gives up, is tested in tests/integration/test_status_codes.py.)
"""

from __future__ import annotations

import random
import re
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orders_service_api.v1 import orders_pb2 as pb
from sqlalchemy import select
from sqlalchemy.engine import make_url

from db.engine import EngineSettings, make_engine
from db.tables import orders
from tests.invariants import check_invariants, settled
from tests.support import ServerProcess, Stubs, apply_schema, wait_until
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.chaos, pytest.mark.postgres, pytest.mark.timeout(120)]

DEADLINE_S = 2.0
SLACK_S = 0.5  # scheduling and logging on a loaded two-core machine
OUTAGE_S = 5.0
CLIENTS = 4
INITIAL_STOCK = {"SKU-PLENTY": 1_000_000, "SKU-SCARCE": 40}

# server/logs.py's text format: "2025-01-01 12:00:00,123 WARNING [thread] logger correlation_id=... ..."
LOG_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<level>[A-Z]+)\s+\[(?P<thread>[^\]]+)\] "
    r"(?P<logger>\S+) correlation_id=(?P<correlation_id>\S+) order_id=\S+ (?P<message>.*)$"
)
CLAIM_FAILED = re.compile(r"claiming outbox events failed \(.*\); next try in (?P<pause>[\d.]+)s")
SETTLED_LINE = re.compile(r"order \S+ is (VALIDATED|FAILED)")
ACCESS = re.compile(r"rpc /orders\.v1\.OrderService/PlaceOrder code=(?P<code>\w+) duration_ms=(?P<ms>[\d.]+)")


@dataclass(frozen=True)
class Call:
    request_id: str
    started: float  # time.monotonic()
    ended: float
    code: str  # grpc.StatusCode name, OK when acknowledged
    order_id: str | None

    @property
    def duration(self) -> float:
        return self.ended - self.started


@dataclass(frozen=True)
class LogLine:
    time: float  # epoch seconds
    level: str
    thread: str
    correlation_id: str
    message: str


def parse_log(text: str) -> list[LogLine]:
    lines = []
    for raw in text.splitlines():
        match = LOG_LINE.match(raw)
        if match is None:
            continue
        stamp = datetime.strptime(match["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        lines.append(
            LogLine(stamp, match["level"], match["thread"], match["correlation_id"], match["message"])
        )
    return lines


class Load:
    """Client threads placing orders, each call with a fresh request_id (also its correlation id)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = Stubs(channel).orders
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.calls: list[Call] = []
        self._threads = [
            threading.Thread(target=self._run, args=(random.Random(i),), name=f"client-{i}", daemon=True)
            for i in range(CLIENTS)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(DEADLINE_S + 5)
        assert not any(t.is_alive() for t in self._threads), "a client call outlived its deadline"

    def acknowledged(self, since: float = 0.0) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.code == "OK" and c.started >= since]

    def _run(self, rng: random.Random) -> None:
        while not self._stop.is_set():
            request_id = f"outage-{uuid.uuid4()}"
            items = [pb.OrderItem(sku="SKU-PLENTY", quantity=rng.randint(1, 3))]
            if rng.random() < 0.5:  # scarce stock runs out: some orders end FAILED, not all VALIDATED
                items.append(pb.OrderItem(sku="SKU-SCARCE", quantity=rng.randint(1, 2)))
            request = pb.PlaceOrderRequest(customer_id=f"cust-{rng.randint(1, 20)}", items=items)
            request.request_id = request_id
            started = time.monotonic()
            try:
                response = self._stub.PlaceOrder(
                    request, timeout=DEADLINE_S, metadata=[("x-correlation-id", request_id)]
                )
                call = Call(request_id, started, time.monotonic(), "OK", response.order.order_id)
            except grpc.RpcError as error:
                call = Call(request_id, started, time.monotonic(), error.code().name, None)
            with self._lock:
                self.calls.append(call)
            # Pacing, not waiting for anything: a failing call returns at once, and four clients
            # in a tight loop would only fill the log.
            self._stop.wait(0.01)


def health(channel: grpc.Channel) -> str:
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.RpcError as error:
        return f"error {error.code().name}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def through(url: str, proxy: TcpProxy) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def migrated(url: str) -> str:
    """The operator's step: the schema is applied directly, not through the proxy."""
    return apply_schema(url)


def start_through_proxy(
    spawn_server: Callable[..., ServerProcess], url: str, proxy: TcpProxy
) -> ServerProcess:
    """An `orders-server` process whose database connections all go through the proxy, with quick
    health checks, polls, retries and leases, and the test's stock loaded."""
    server = spawn_server(
        *("--database-url", through(url, proxy)),
        *("--health-interval-s", "0.5"),
        *("--lease-s", "2"),
        *("--poll-interval-s", "0.2"),
        *("--retry-base-s", "0.1"),
        *("--retry-max-s", "1"),
        *("--breaker-reset-s", "1"),
    )
    for sku, available in INITIAL_STOCK.items():
        server.stubs.set_stock(sku, available)
    return server


@pytest.fixture
def pg_proxy(postgres_server: str) -> Iterator[TcpProxy]:
    """A proxy to the test PostgreSQL. Ask for it after make_pg_database and before spawn_server:
    fixtures end in reverse, so the server stops while its database is still reachable."""
    target = make_url(postgres_server)
    with TcpProxy((target.host or "127.0.0.1", target.port or 5432)) as proxy:
        yield proxy


def test_a_database_outage_under_load_loses_no_order_and_the_service_recovers_on_its_own(
    make_pg_database: Callable[[], str],
    pg_proxy: TcpProxy,
    spawn_server: Callable[..., ServerProcess],
) -> None:
    url = migrated(make_pg_database())
    server = start_through_proxy(spawn_server, url, pg_proxy)
    assert health(server.channel) == "SERVING"

    with Load(server.channel) as load:
        wait_until(lambda: len(load.acknowledged()) >= 30, timeout=15, what="orders before the outage")

        cut_at, cut_wall = time.monotonic(), time.time()
        pg_proxy.cut()
        wait_until(
            lambda: health(server.channel) == "NOT_SERVING", timeout=5, interval=0.05, what="NOT_SERVING"
        )
        not_serving_s = time.monotonic() - cut_at
        # The outage itself lasts a fixed time: nothing to wait for, the point is to stay down.
        threading.Event().wait(max(OUTAGE_S - (time.monotonic() - cut_at), 0))
        assert server.proc.poll() is None, "the server died during the outage"
        restored_at, restored_wall = time.monotonic(), time.time()
        pg_proxy.restore()
        wait_until(
            lambda: health(server.channel) == "SERVING", timeout=5, interval=0.05, what="SERVING again"
        )
        serving_again_s = time.monotonic() - restored_at
        wait_until(
            lambda: len(load.acknowledged(since=restored_at)) >= 30,
            timeout=15,
            what="orders after the outage",
        )
    outage_s = restored_at - cut_at

    calls = list(load.calls)
    during = [c for c in calls if c.started >= cut_at + 0.05 and c.ended <= restored_at]
    overlapping = [c for c in calls if c.ended >= cut_at and c.started <= restored_at]
    acknowledged = [c for c in calls if c.code == "OK"]
    server_log = parse_log(server.log())
    server_ms = {
        line.correlation_id: float(match["ms"])
        for line in server_log
        if (match := ACCESS.search(line.message)) is not None
    }
    warnings = [line for line in server_log if line.level == "WARNING" and line.time >= cut_wall - 0.05]
    claim_failures = [
        (line.time, float(match["pause"]))
        for line in warnings
        if (match := CLAIM_FAILED.search(line.message)) is not None
    ]
    resumed = [
        line.time for line in server_log if line.time >= restored_wall and SETTLED_LINE.search(line.message)
    ]
    per_second: dict[int, int] = {}
    for line in warnings:
        if line.time <= restored_wall + 2:
            second = int(line.time - cut_wall)
            per_second[second] = per_second.get(second, 0) + 1
    figures = {
        "outage_s": round(outage_s, 2),
        "to_not_serving_s": round(not_serving_s, 2),
        "back_to_serving_s": round(serving_again_s, 2),
        "calls_during_outage": len(during),
        "codes_during_outage": dict(
            sorted({c.code: sum(1 for d in during if d.code == c.code) for c in during}.items())
        ),
        "max_call_s_during_outage": round(max((c.duration for c in during), default=0), 3),
        "median_call_s_during_outage": round(statistics.median([c.duration for c in during]), 4)
        if during
        else 0,
        "max_server_ms_during_outage": max((server_ms.get(c.request_id, 0) for c in overlapping), default=0),
        "claim_failure_pauses_s": [pause for _, pause in claim_failures],
        "warnings_per_second": per_second,
        "proxy": {"forwarded": pg_proxy.forwarded, "refused": pg_proxy.refused, "dropped": pg_proxy.dropped},
    }
    print(f"\ndatabase outage figures: {figures}")

    # Calls during the outage: a clear status at once, never a hang, on the client or in the server.
    assert during, f"no call ran inside the outage: {figures}"
    assert {c.code for c in during} <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, figures
    assert {c.code for c in overlapping} <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, figures
    assert max(c.duration for c in overlapping) <= DEADLINE_S + SLACK_S, figures
    assert all(server_ms.get(c.request_id, 0) <= (DEADLINE_S + SLACK_S) * 1000 for c in overlapping), figures
    fast = [c for c in during if c.code == "UNAVAILABLE" and c.duration < 0.5]
    assert len(fast) >= 0.9 * len(during), f"calls should fail fast with UNAVAILABLE: {figures}"

    # Health follows the database both ways, within a few health intervals.
    assert not_serving_s <= 3, figures
    assert serving_again_s <= 3, figures

    # The dispatcher backs off: growing pauses and no storm of warnings. A pause may end early when
    # a wake-up arrives (a saga step finishing, a notification): that is how it resumes at once after
    # the outage, so the pauses are checked for growth, and the warning rate for spinning.
    pauses = [pause for _, pause in claim_failures]
    assert len(pauses) >= 2, f"the dispatcher should have failed to claim more than once: {figures}"
    assert pauses == sorted(pauses) and pauses[-1] > pauses[0], f"pauses should grow: {figures}"
    # The first second has one or two lines per saga step in flight: up to 8 workers' worth, and a
    # worker running a batch holds up to a round's events (2 x 8), each with its line when its
    # outcome cannot be recorded; after it, only the threads that retry on their own (dispatcher,
    # listener, health, housekeeping) may warn.
    assert per_second.get(0, 0) <= 2 * 8 + 2 * 8 + 10, f"too many warnings when the outage began: {figures}"
    assert max(v for k, v in per_second.items() if k >= 1) <= 6, f"warnings keep coming: {figures}"

    # Nothing acknowledged is lost; everything settles once the database is back.
    assert server.proc.poll() is None, "the server died"
    wait_until(lambda: settled(url), timeout=30, interval=0.2, what="every order and event to settle")
    resumed = [
        line.time
        for line in parse_log(server.log())
        if line.time >= restored_wall and SETTLED_LINE.search(line.message)
    ]
    resumed_s = round(resumed[0] - restored_wall, 2) if resumed else None
    assert resumed_s is not None and resumed_s <= 5, f"sagas resumed {resumed_s}s after the restore"
    engine = make_engine(url, EngineSettings(pool_size=1, max_overflow=0))
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(orders.c.id, orders.c.request_id, orders.c.status)).all()
    finally:
        engine.dispose()
    stored = {row.request_id: (row.id, row.status) for row in rows}
    lost = [c.request_id for c in acknowledged if c.request_id not in stored]
    assert not lost, f"{len(lost)} acknowledged order(s) are not in the database: {lost[:5]}"
    assert all(stored[c.request_id][0] == c.order_id for c in acknowledged)
    outcomes = {c.request_id: stored[c.request_id][1] for c in acknowledged}
    assert set(outcomes.values()) <= {"VALIDATED", "FAILED"}, outcomes
    summary = check_invariants(url, url, INITIAL_STOCK)
    print(
        f"sagas resumed {resumed_s}s after the restore; orders acknowledged {len(acknowledged)}, "
        f"all settled {dict(Counter(outcomes.values()))}; stored {len(rows)}, by status "
        f"{dict(summary.orders_by_status)}, events {dict(summary.events_by_status)}"
    )


def test_a_database_that_stops_answering_turns_health_not_serving_and_calls_end_by_their_deadline(
    make_pg_database: Callable[[], str],
    pg_proxy: TcpProxy,
    spawn_server: Callable[..., ServerProcess],
) -> None:
    """A partition or a dead host: no reset, no refusal, nothing answers (`TcpProxy.blackhole`)."""
    url = migrated(make_pg_database())
    server = start_through_proxy(spawn_server, url, pg_proxy)
    for _ in range(5):  # connections in the pool, which the blackhole then swallows
        server.stubs.place("warm-up", [("SKU-PLENTY", 1)])
    stub = server.stubs.orders

    def place(index: int) -> Call:
        request_id = f"blackhole-{index}-{uuid.uuid4()}"
        request = pb.PlaceOrderRequest(
            customer_id="c1", items=[pb.OrderItem(sku="SKU-PLENTY", quantity=1)], request_id=request_id
        )
        started = time.monotonic()
        try:
            order = stub.PlaceOrder(request, timeout=DEADLINE_S, metadata=[("x-correlation-id", request_id)])
            return Call(request_id, started, time.monotonic(), "OK", order.order.order_id)
        except grpc.RpcError as error:
            return Call(request_id, started, time.monotonic(), error.code().name, None)

    def handler_ms(calls: list[Call]) -> dict[str, float]:
        found = {
            line.correlation_id: float(match["ms"])
            for line in parse_log(server.log())
            if (match := ACCESS.search(line.message)) is not None
        }
        return {c.request_id: found[c.request_id] for c in calls if c.request_id in found}

    pg_proxy.blackhole()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(6) as pool:  # fewer than the server's handler threads
            calls = list(pool.map(place, range(6)))
        wait_until(
            lambda: health(server.channel) == "NOT_SERVING", timeout=6, interval=0.1, what="NOT_SERVING"
        )
        not_serving_s = time.monotonic() - started
        # Each handler has given up by the call's deadline (plus a little): none is left waiting.
        wait_until(lambda: len(handler_ms(calls)) == len(calls), timeout=2, what="every handler to end")
    finally:
        pg_proxy.restore()
    durations = handler_ms(calls)
    print(f"\nblackhole: NOT_SERVING after {not_serving_s:.2f}s, handlers ended after {durations} ms")
    assert {c.code for c in calls} <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert max(c.duration for c in calls) <= DEADLINE_S + SLACK_S
    assert max(durations.values()) <= (DEADLINE_S + 1.0) * 1000

    wait_until(lambda: health(server.channel) == "SERVING", timeout=10, interval=0.1, what="SERVING again")
    wait_until(lambda: settled(url), timeout=30, interval=0.2, what="every order and event to settle")
    engine = make_engine(url, EngineSettings(pool_size=1, max_overflow=0))
    try:
        with engine.connect() as connection:
            stored = set(connection.execute(select(orders.c.request_id)).scalars())
    finally:
        engine.dispose()
    # API.md: past the deadline, the call's database work is abandoned, not done later.
    assert not stored & {c.request_id for c in calls}
    check_invariants(url, url, INITIAL_STOCK)
