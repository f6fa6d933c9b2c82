"""Cluster-wide guards through Redis (DESIGN.md, "Running it": `ORDERS_REDIS_URL`).

With `redis_url` set, every instance counts inventory calls against the same rate-limit window and
reads the same circuit-breaker state; without it each process has its own. Two in-process servers
share one PostgreSQL database (their dispatchers compete for the same outbox), so the combined
completion rate of 40 orders holds to the limit (5/s) with Redis, and goes up to twice the limit
without.

Redis is the local server (`ORDERS_TEST_REDIS_URL`, default database 5, emptied for each test).
Like PostgreSQL, it may be missing on a laptop (the tests skip) but not under CI (they fail).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pybreaker
import pytest
import redis
from sqlalchemy import select

from db.tables import orders
from generated.orders.v1 import orders_pb2 as pb
from server.bootstrap import build_guard
from server.config import Settings
from tests.conftest import InProcessServer
from tests.support import wait_until

pytestmark = pytest.mark.postgres

REDIS_TEST_URL = os.environ.get("ORDERS_TEST_REDIS_URL", "redis://127.0.0.1:6379/5")
REQUIRE_REDIS = os.environ.get("ORDERS_TEST_REQUIRE_REDIS") == "1" or os.environ.get("CI") == "true"
# The key and namespace are fixed in the code (server.bootstrap.build_guard, saga.resilience), so
# tests that run at the same time on one Redis database take turns through this key.
CLAIM_KEY = "orders-tests:claimed"

SKU = "LIMIT-SKU"
RATE_PER_S = 5
ORDERS = 40


@pytest.fixture(scope="session")
def redis_server() -> str:
    try:
        client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=5)
        client.ping()
        client.close()
    except redis.RedisError as error:
        message = f"Redis at {REDIS_TEST_URL} is not reachable: {error}"
        if REQUIRE_REDIS:
            pytest.fail(message + " (required under CI)")
        pytest.skip(message)
    return REDIS_TEST_URL


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The test Redis database, empty and held by this test alone; emptied again afterwards."""
    client = redis.Redis.from_url(redis_server)
    token = uuid.uuid4().hex
    wait_until(
        lambda: client.set(CLAIM_KEY, token, nx=True, ex=120), timeout=120, interval=0.2,
        what=f"{redis_server} to be free (another test run holds {CLAIM_KEY})",
    )  # fmt: skip
    for key in client.scan_iter():
        if key != CLAIM_KEY.encode():
            client.delete(key)
    try:
        yield redis_server
    finally:
        client.flushdb()
        client.close()


@dataclass(frozen=True)
class Run:
    rate_per_s: float  # orders settled per second, first placement to last settlement
    busiest_second: int  # most inventory calls let through within one second, for sure
    done_by_server: tuple[int, int]


def record_admissions(server: InProcessServer, into: list[tuple[float, float]]) -> None:
    """Note when each inventory call the server's rate limiter lets through asked and was answered."""
    limiter = server.service.guard.limiter
    acquire = limiter.acquire

    def recording() -> None:
        asked = time.monotonic()
        acquire()
        into.append((asked, time.monotonic()))

    limiter.acquire = recording  # type: ignore[method-assign]


def busiest_second(admissions: list[tuple[float, float]]) -> int:
    """The most admissions that certainly fell within one second: asked and answered inside it
    (a call to Redis can take tens of milliseconds on a busy machine)."""
    return max(
        sum(1 for asked, answered in admissions if asked >= start and answered - start < 1.0)
        for start, _ in admissions
    )


def settle_rate(start_server: Callable[..., InProcessServer], database_url: str, redis_url: str) -> Run:
    """Place ORDERS orders through two servers at once; how fast do they settle together?"""
    servers = [
        start_server(database_url=database_url, redis_url=redis_url, inventory_rate=f"{RATE_PER_S}/second")
        for _ in range(2)
    ]
    admitted: list[tuple[float, float]] = []
    try:
        for server in servers:
            record_admissions(server, admitted)
        servers[0].stubs.set_stock(SKU, 10_000)
        with ThreadPoolExecutor(8) as pool:
            placed = list(
                pool.map(lambda i: servers[i % 2].stubs.place(f"customer-{i}", [(SKU, 1)]), range(ORDERS))
            )
        engine = servers[0].service.engines.orders
        ids = [order.order_id for order in placed]

        def times() -> list[tuple[datetime, datetime]] | None:
            query = select(orders.c.create_time, orders.c.update_time, orders.c.status).where(
                orders.c.id.in_(ids)
            )
            with engine.connect() as connection:
                rows = connection.execute(query).all()
            if len(rows) < ORDERS or any(row.status != "VALIDATED" for row in rows):
                return None
            return [(row.create_time, row.update_time) for row in rows]

        settled = wait_until(
            times, timeout=ORDERS / RATE_PER_S + 10, interval=0.1, what="every order VALIDATED"
        )
        first = min(created for created, _ in settled)
        last = max(updated for _, updated in settled)
        done = tuple(s.service.dispatcher.stats.done for s in servers if s.service.dispatcher)
        assert len(done) == 2
        return Run(ORDERS / (last - first).total_seconds(), busiest_second(admitted), (done[0], done[1]))
    finally:
        for server in servers:
            server.close()


def test_a_rate_limit_in_redis_holds_for_all_instances_together_and_a_local_one_per_process(
    make_pg_database: Callable[[], str],
    start_server: Callable[..., InProcessServer],
    redis_url: str,
    record_property: Callable[[str, Any], None],
) -> None:
    shared = settle_rate(start_server, make_pg_database(), redis_url)
    local = settle_rate(start_server, make_pg_database(), "")
    record_property("rate_with_redis", round(shared.rate_per_s, 2))
    record_property("rate_without_redis", round(local.rate_per_s, 2))
    record_property("busiest_second_with_redis", shared.busiest_second)
    record_property("busiest_second_without_redis", local.busiest_second)

    assert all(shared.done_by_server) and all(local.done_by_server), "both dispatchers took part"
    # With Redis: one moving window for the cluster, about 5 calls in any second and about 5 orders
    # a second. (Not exactly 5: `limits` stamps each hit with the caller's clock before its Redis
    # script runs.)
    assert shared.busiest_second <= RATE_PER_S + 1, shared
    assert shared.rate_per_s <= RATE_PER_S * 1.2, shared
    # Without: a window per process, so twice the calls in a second. Over the whole run it is less
    # than twice as fast: a process claims events its own limiter then defers while the other idles.
    assert local.busiest_second / shared.busiest_second >= 1.5, (shared, local)
    assert local.rate_per_s / shared.rate_per_s >= 1.1, (shared, local)


def test_an_open_breaker_in_redis_is_open_for_every_instance(
    make_pg_database: Callable[[], str],
    start_server: Callable[..., InProcessServer],
    redis_url: str,
) -> None:
    url = make_pg_database()
    # A only serves the API; B runs the saga and so consults the breaker that A opened.
    a = start_server(database_url=url, redis_url=redis_url, saga_workers=0, breaker_reset_s=2.0)
    b = start_server(database_url=url, redis_url=redis_url, breaker_reset_s=2.0)
    breaker_a, breaker_b = a.service.guard.breaker, b.service.guard.breaker
    assert (breaker_a.current_state, breaker_b.current_state) == (pybreaker.STATE_CLOSED,) * 2

    breaker_a.open()

    assert breaker_b.current_state == pybreaker.STATE_OPEN
    a.stubs.set_stock(SKU, 10)
    order = a.stubs.place("breaker-customer", [(SKU, 1)])
    wait_until(
        lambda: b.service.dispatcher is not None and b.service.dispatcher.stats.deferred >= 1,
        what="B's dispatcher to defer the order's event while A's breaker is open",
    )
    assert a.stubs.get(order.order_id).status == pb.ORDER_STATUS_PENDING

    breaker_a.close()

    assert breaker_b.current_state == pybreaker.STATE_CLOSED
    wait_until(
        lambda: a.stubs.get(order.order_id).status == pb.ORDER_STATUS_VALIDATED,
        what="the deferred order validated once the breaker closed",
    )


def test_without_redis_each_process_has_a_breaker_of_its_own() -> None:
    settings = Settings(inventory_rate=f"{RATE_PER_S}/second")
    a, b = build_guard(settings), build_guard(settings)

    a.breaker.open()

    assert (a.breaker.current_state, b.breaker.current_state) == (
        pybreaker.STATE_OPEN,
        pybreaker.STATE_CLOSED,
    )


class PrivateRedis:
    """A `redis-server` of this test's own, to take away and bring back."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("no redis-server binary to start a private Redis")
        self._binary = binary
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                self._binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        wait_until(lambda: _answers(client), timeout=10, what="the private Redis to answer")
        client.close()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


def test_a_redis_outage_does_not_fail_orders(
    sqlite_url: str, start_server: Callable[..., InProcessServer], private_redis: PrivateRedis
) -> None:
    server = start_server(database_url=sqlite_url, redis_url=private_redis.url, max_attempts=3)
    server.stubs.set_stock(SKU, 10)
    before = server.stubs.place("before-outage", [(SKU, 1)])
    wait_until(lambda: server.stubs.get(before.order_id).status == pb.ORDER_STATUS_VALIDATED)

    private_redis.stop()
    # Without its shared counters each process counts on its own: the saga goes on.
    during = server.stubs.place("during-outage", [(SKU, 1)])
    wait_until(
        lambda: server.stubs.get(during.order_id).status == pb.ORDER_STATUS_VALIDATED,
        timeout=15, what="the order validated while Redis is down",
    )  # fmt: skip

    private_redis.start()
    after = server.stubs.place("after-outage", [(SKU, 1)])
    wait_until(
        lambda: server.stubs.get(after.order_id).status == pb.ORDER_STATUS_VALIDATED,
        timeout=15, what="the order validated once Redis is back",
    )  # fmt: skip
    assert server.stubs.stock(SKU).reserved == 3
