"""Health.Watch streams that hang up while the status changes must not freeze health or shutdown."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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
