"""Health while a process starts: a probe must not hear SERVING before the first database check.

Kubernetes' gRPC readiness probe (and any load balancer that health-checks) sends traffic to a
process as soon as `Health/Check` says SERVING. The first check of a database that does not answer
takes the connect timeout; the database here is a socket that accepts and never replies.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import bootstrap
from tests.conftest import fast_settings
from tests.support import wait_until


class SilentDatabase:
    """A PostgreSQL server that accepts connections and never says a word, until it hangs up."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self._accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        port = self._listener.getsockname()[1]
        self.url = f"postgresql://postgres@127.0.0.1:{port}/orders?sslmode=disable"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                self._accepted.append(self._listener.accept()[0])
            except TimeoutError:
                continue

    def hang_up(self) -> None:
        """Close every connection and the port: waiting clients fail at once, new ones are refused."""
        self._stop.set()
        self._thread.join(5)
        for connection in self._accepted:
            connection.close()
        self._listener.close()


@pytest.fixture
def silent_database() -> Iterator[SilentDatabase]:
    database = SilentDatabase()
    yield database
    database.hang_up()


def test_a_starting_process_does_not_report_serving_before_its_database_answered(
    silent_database: SilentDatabase,
) -> None:
    service = bootstrap.build(fast_settings(database_url=silent_database.url, migrate_on_start="never"))
    starting = threading.Thread(target=service.start, daemon=True)
    starting.start()
    answers: list[str] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 1.5
            while starting.is_alive() and time.monotonic() < deadline:
                try:
                    response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    answers.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
                except grpc.RpcError as error:
                    answers.append(error.code().name)  # not listening yet: fine
                time.sleep(0.05)  # a probe's period, not a wait for work
    finally:
        silent_database.hang_up()
        starting.join(30)
        service.stop(grace=0.5)
    assert answers, "no probe was sent while the process started"
    assert "SERVING" not in answers, f"probes during start-up heard: {sorted(set(answers))}"


@pytest.mark.postgres
def test_a_started_server_opens_database_connections_ahead_of_calls(make_pg_database, start_server):
    server = start_server(database_url=make_pg_database(), saga_workers=2)
    pool = server.service.engines.orders.pool
    # Saga workers and a few handlers' worth, opened in the background at start.
    wait_until(lambda: pool.checkedin() >= 10, what="the pool to be warmed")
