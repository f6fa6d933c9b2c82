"""Health.Watch streams that hang up while the status changes must not freeze health or shutdown,
and streams that end leave nothing behind."""

from __future__ import annotations

import gc
import sys
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def test_status_flips_while_watchers_come_and_go_never_deadlock(start_server, sqlite_url):
    server = start_server(database_url=sqlite_url, saga_workers=0, health_interval_s=3600, max_workers=4)
    servicer = server.service.health._servicer
    stub = health_pb2_grpc.HealthStub(server.channel)
    flips_done = threading.Event()

    def flip() -> None:
        for i in range(300):
            servicer.set("", NOT_SERVING if i % 2 else SERVING)
        flips_done.set()

    # Watchers that read nothing after the first answer, then hang up while the status flips.
    watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(40)]
    for watch in watches:
        next(watch)
    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    for watch in watches:
        watch.cancel()
    flipper.join(20)
    assert flips_done.is_set(), "health status changes froze: a Watch hang-up deadlocked the servicer"

    servicer.set("", SERVING)
    still = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert still.status == SERVING
    stopper = threading.Thread(target=server.service.stop, kwargs={"grace": 0.5}, daemon=True)
    stopper.start()
    stopper.join(20)
    assert not stopper.is_alive(), "shutdown froze on open Watch streams"
    try:
        stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_watches_of_unknown_services_answer_service_unknown_stay_open_and_leave_nothing_behind(
    start_server, sqlite_url
):
    # No health checks during the test: the database checks' own allocations would blur the count.
    server = start_server(database_url=sqlite_url, saga_workers=0, health_interval_s=3600)
    servicer = server.service.health._servicer
    stub = health_pb2_grpc.HealthStub(server.channel)

    late = stub.Watch(health_pb2.HealthCheckRequest(service="orders.v1.Late"), timeout=30)
    assert next(late).status == SERVICE_UNKNOWN
    servicer.set("orders.v1.Late", SERVING)  # the service becomes known: the open stream is told
    assert next(late).status == SERVING
    late.cancel()

    def watch_and_hang_up(names: list[str]) -> set[int]:
        calls = [stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=30) for name in names]
        try:
            return {next(call).status for call in calls}
        finally:
            for call in calls:
                call.cancel()

    def nothing_open() -> bool:
        return servicer.watchers == 0 and server.service.admission.open_streams("health_watch") == 0

    watch_and_hang_up([f"warm-up.{n}" for n in range(1000)])
    wait_until(nothing_open, what="the warm-up watches to be forgotten")
    gc.collect()
    before = sys.getallocatedblocks()
    statuses: set[int] = set()
    for batch in range(50):
        statuses |= watch_and_hang_up([f"no.such.Service{batch}.{n}" for n in range(200)])
    wait_until(nothing_open, what="10,000 watches to be forgotten")

    def growth() -> int:
        gc.collect()
        return sys.getallocatedblocks() - before

    assert statuses == {SERVICE_UNKNOWN}
    # The interpreter's live memory blocks. Anything kept per stream (each name with its empty set
    # of watchers kept two) would be 10,000 blocks at least, for good; the clients' and grpcio's
    # own objects of the last calls go within moments (under a thousand blocks are left).
    wait_until(lambda: growth() < 2_000, timeout=5, interval=0.2, what="memory back to where it was")
