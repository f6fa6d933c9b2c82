"""The relay's processes: our outbox dispatcher and pgqueuer, consumers and paced producers.

Drain: N jobs already queued, a no-op handler, a fixed number in flight; jobs per second until all
are done.
Pickup: a producer paced at a steady rate; per job, the wall-clock time from the enqueue call's
start (for us: the PlaceOrder call's start) to its handler's start. Every consumer and producer
runs in its own spawned process, as a server and its clients would. Times are `time.time()`, the
machine's one wall clock, so the two sides of a pair come from different processes safely.
bench/scenarios/drain_and_pickup.py runs them and pairs the times.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any, TypedDict

import grpc
from orders_service_api.v1 import orders_pb2 as pb
from orders_service_api.v1 import orders_pb2_grpc as pb_grpc
from sqlalchemy.engine import make_url

from bench import operations
from bench.plan import PG_ADMIN_URL
from tests.local_services import pg_connect

if TYPE_CHECKING:  # the service's code is imported only in the spawned processes
    from saga.dispatcher import OutboxDispatcher

ENTRYPOINT = "relay"
# Time for a spawned process to import and connect before the paced producer starts.
STARTUP_S = 1.5


def in_processes(*calls: tuple[Any, ...]) -> list[Any]:
    """Run each (function, *args) in its own fresh spawned process, all at once; their results."""
    with ProcessPoolExecutor(len(calls), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(*call) for call in calls]
        return [future.result() for future in futures]


def asyncpg_dsn(dbname: str) -> str:
    """The URI of one of the run's databases as asyncpg takes it (no `+driver`)."""
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql", database=dbname)
    return url.render_as_string(hide_password=False)


# --- our outbox ----------------------------------------------------------------------------------


def insert_pending(url: str, events: int) -> None:
    """N PENDING ORDER_CREATED events, one aggregate each (so per-order ordering holds none back)."""
    insert_and_analyze(
        url,
        """INSERT INTO outbox_events (aggregate_id, event_type, payload, headers, status,
             attempts, available_at, created_at, updated_at)
           SELECT id, 'ORDER_CREATED', json_build_object('order_id', id)::text, '{}', 'PENDING',
             0, now(), now(), now()
           FROM (SELECT gen_random_uuid()::text AS id FROM generate_series(1, %s)) AS g""",
        events,
        "outbox_events",
    )


def insert_and_analyze(url: str, insert: str, rows: int, table: str) -> None:
    """Run `insert` (its one parameter: `rows`) and commit, then ANALYZE `table`, as autovacuum
    would have done on a table that grew this big."""
    connection = pg_connect(url)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(insert, (rows,))
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {table}")
    finally:
        connection.close()


def our_drain(database_url: str, events: int, in_flight: int) -> dict[str, Any]:
    """OutboxDispatcher with a no-op handler on `in_flight` workers, timed until `events` are DONE.

    Runs in a spawned process: it imports the service code, which the bench's own process need not."""
    from db.engine import EngineSettings, make_engine
    from db.unit_of_work import OrdersUnitOfWork
    from saga.dispatcher import DispatcherSettings, OutboxDispatcher
    from saga.signals import WakeUp
    from saga.verdicts import Done

    # Workers, the dispatcher's claim and a spare: no worker ever waits for a connection.
    engine = make_engine(database_url, EngineSettings(pool_size=in_flight + 2, max_overflow=0))
    settings = DispatcherSettings(workers=in_flight)
    dispatcher = OutboxDispatcher(
        partial(OrdersUnitOfWork, engine), {"ORDER_CREATED": lambda _: Done()}, settings, wake=WakeUp()
    )
    elapsed = timed_drain(dispatcher, events)
    engine.dispose()
    return drain_row(dispatcher.stats.done, elapsed, in_flight, f"poll interval {settings.poll_interval_s} s")


def timed_drain(dispatcher: OutboxDispatcher, events: int) -> float:
    """Start `dispatcher`, wait until it has done `events`, stop it: the seconds it took. Capped, so
    that a dispatcher that stalls shows as a low count instead of hanging the bench."""
    began = time.monotonic()
    dispatcher.start()
    while dispatcher.stats.done < events and time.monotonic() - began < 600:
        time.sleep(0.005)
    elapsed = time.monotonic() - began
    dispatcher.stop(10)
    return elapsed


def drain_row(done: int, elapsed: float, in_flight: int, note: str) -> dict[str, Any]:
    return {
        "events": done,
        "seconds": round(elapsed, 2),
        "per_s": round(done / elapsed, 1) if elapsed > 0 else None,
        "in_flight": in_flight,
        "settings": note,
    }


# --- pgqueuer --------------------------------------------------------------------------------------


async def _pgq_queries(connection: Any) -> Any:
    from pgqueuer import Queries

    return Queries.from_asyncpg_connection(connection)


def pgq_prepare(dbname: str, jobs: int) -> None:
    """Install pgqueuer's schema with its own installer, enqueue `jobs` in batches, ANALYZE."""
    asyncio.run(_pgq_prepare(asyncpg_dsn(dbname), jobs))


async def _pgq_prepare(dsn: str, jobs: int) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        queries = await _pgq_queries(connection)
        await queries.install()
        for start in range(0, jobs, 5000):
            count = min(5000, jobs - start)
            await queries.enqueue(
                [ENTRYPOINT] * count, [str(start + i).encode() for i in range(count)], [0] * count
            )
        await connection.execute("ANALYZE")
    finally:
        await connection.close()


def pgq_drain(dbname: str, jobs: int, in_flight: int) -> dict[str, Any]:
    """pgqueuer's QueueManager in drain mode (it returns once the queue is empty), no-op entrypoint."""
    return asyncio.run(_pgq_drain(asyncpg_dsn(dbname), jobs, in_flight))


class PgqSettings(TypedDict):
    batch_size: int
    max_concurrent_tasks: int


def pgq_settings(in_flight: int) -> PgqSettings:
    """`in_flight` picked jobs at most; pgqueuer wants batches of at most half of that."""
    return {"batch_size": max(1, in_flight // 2), "max_concurrent_tasks": in_flight}


async def _pgq_drain(dsn: str, jobs: int, in_flight: int) -> dict[str, Any]:
    import asyncpg
    from pgqueuer import QueueManager
    from pgqueuer.types import QueueExecutionMode

    connection = await asyncpg.connect(dsn)
    try:
        manager = QueueManager(await _pgq_queries(connection))
        handled = 0

        @manager.entrypoint(ENTRYPOINT)
        async def noop(job: Any) -> None:
            nonlocal handled
            handled += 1

        settings = pgq_settings(in_flight)
        began = time.monotonic()
        await manager.run(mode=QueueExecutionMode.drain, **settings)
        elapsed = time.monotonic() - began
        left = await connection.fetchval("SELECT count(*) FROM pgqueuer")
    finally:
        await connection.close()
    note = ", ".join(f"{k}={v}" for k, v in settings.items()) + ", mode=drain, asyncpg"
    row = drain_row(handled, elapsed, in_flight, note)
    row["left_in_queue"] = int(left)
    row["expected"] = jobs
    return row


def pgq_consume(dbname: str, expected: int, in_flight: int, deadline: float) -> dict[str, Any]:
    """A continuous QueueManager recording time.time() at each handler's start, until it has seen
    `expected` jobs or the wall clock passes `deadline`."""
    return asyncio.run(_pgq_consume(asyncpg_dsn(dbname), expected, in_flight, deadline))


async def _pgq_consume(dsn: str, expected: int, in_flight: int, deadline: float) -> dict[str, Any]:
    import asyncpg
    from pgqueuer import QueueManager

    connection = await asyncpg.connect(dsn)
    started: dict[str, float] = {}
    try:
        manager = QueueManager(await _pgq_queries(connection))

        @manager.entrypoint(ENTRYPOINT)
        async def record(job: Any) -> None:
            started[job.payload.decode()] = time.time()
            if len(started) >= expected:
                manager.shutdown.set()

        async def stop_at_deadline() -> None:
            await asyncio.sleep(max(0.0, deadline - time.time()))
            manager.shutdown.set()

        guard = asyncio.create_task(stop_at_deadline())
        ready_at = time.time()
        await manager.run(**pgq_settings(in_flight))
        guard.cancel()
    finally:
        await connection.close()
    return {"ready_at": ready_at, "started": started}


def pgq_produce(dbname: str, rate: float, duration: float, start_at: float) -> dict[str, float]:
    """Enqueue one job every 1/rate s from `start_at` (wall clock) for `duration`; time.time() at
    each enqueue call's start, by job. Each enqueue is its own task on a small pool, so one slow
    call does not hold back the schedule."""
    return asyncio.run(_pgq_produce(asyncpg_dsn(dbname), rate, duration, start_at))


async def _pgq_produce(dsn: str, rate: float, duration: float, start_at: float) -> dict[str, float]:
    import asyncpg
    from pgqueuer import Queries

    sent: dict[str, float] = {}
    async with asyncpg.create_pool(dsn, min_size=4, max_size=4) as pool:
        queries = Queries.from_asyncpg_pool(pool)

        async def one(key: str) -> None:
            sent[key] = time.time()
            await queries.enqueue(ENTRYPOINT, key.encode())

        tasks = []
        for n in range(int(rate * duration)):
            await asyncio.sleep(max(0.0, start_at + n / rate - time.time()))
            tasks.append(asyncio.create_task(one(str(n))))
        await asyncio.gather(*tasks)
    return sent


# --- our pickup ------------------------------------------------------------------------------------


def paced_place(address: str, rate: float, duration: float, start_at: float, skus: int) -> dict[str, float]:
    """PlaceOrder every 1/rate s from `start_at` (wall clock) for `duration`, each call with its own
    `x-correlation-id`; time.time() at each call's start, by correlation id. A pool of threads
    makes the calls so that a slow one does not hold back the schedule. The channel connects
    before the schedule starts, as pgqueuer's producer opens its pool first: the first call would
    otherwise count the TCP and HTTP/2 set-up as pickup."""
    sent: dict[str, float] = {}
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=max(start_at - time.time(), 0.0) + 10)
        stub = pb_grpc.OrderServiceStub(channel)
        request = pb.PlaceOrderRequest(
            customer_id="bench-pickup", items=[pb.OrderItem(sku=operations.sku_name(0), quantity=1)]
        )

        def call(n: int) -> None:
            correlation_id = str(uuid.uuid4())
            mine = pb.PlaceOrderRequest()
            mine.CopyFrom(request)
            mine.items[0].sku = operations.sku_name(n % skus)
            mine.request_id = correlation_id
            sent[correlation_id] = time.time()
            stub.PlaceOrder(
                mine, timeout=operations.TIMEOUT_S, metadata=(("x-correlation-id", correlation_id),)
            )

        with ThreadPoolExecutor(32) as threads:
            futures = []
            for n in range(int(rate * duration)):
                time.sleep(max(0.0, start_at + n / rate - time.time()))
                futures.append(threads.submit(call, n))
            for future in futures:
                future.result()
    return sent
