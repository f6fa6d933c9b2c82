"""Fixtures: throwaway databases on both backends, in-process servers and real server processes.

PostgreSQL tests need the local server. Without it they skip on a laptop, but under CI
(`CI=true` or `ORDERS_TEST_REQUIRE_POSTGRES=1`) they fail: CI must never pass by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from server import bootstrap
from server.config import Settings
from tests.local_services import create_database, drop_databases, pg_connect, with_database
from tests.support import ServerProcess, Stubs, apply_schema, server_env

PG_ADMIN_URL = os.environ.get("ORDERS_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("ORDERS_TEST_REQUIRE_POSTGRES") == "1" or os.environ.get("CI") == "true"
NATS_URL = os.environ.get("ORDERS_TEST_NATS_URL", "nats://127.0.0.1:4222")
REQUIRE_NATS = os.environ.get("ORDERS_TEST_REQUIRE_NATS") == "1" or os.environ.get("CI") == "true"


def _pg_reachable() -> str | None:
    try:
        pg_connect(PG_ADMIN_URL).close()
    except Exception as error:
        return str(error)
    return None


@pytest.fixture(scope="session")
def postgres_server() -> str:
    problem = _pg_reachable()
    if problem is not None:
        message = f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {problem}"
        if REQUIRE_PG:
            pytest.fail(message + " (required under CI)")
        pytest.skip(message)
    return PG_ADMIN_URL


@pytest.fixture(scope="session")
def nats_url() -> str:
    """The local NATS server with JetStream (the event relay's tests); they skip without it on a
    laptop and fail under CI, like the PostgreSQL tests."""
    from tests.events_support import nats_reachable

    problem = nats_reachable(NATS_URL)
    if problem is not None:
        message = f"NATS at {NATS_URL} is not reachable: {problem}"
        if REQUIRE_NATS:
            pytest.fail(message + " (required under CI)")
        pytest.skip(message)
    return NATS_URL


@pytest.fixture
def event_stream(nats_url: str) -> Iterator[Any]:
    """A JetStream stream and subject prefix of this test's own, deleted at the end."""
    from tests.events_support import EventStream

    stream = EventStream.fresh(nats_url)
    yield stream
    stream.delete()


@pytest.fixture
def make_pg_database(postgres_server: str) -> Iterator[Callable[[], str]]:
    """Factory of fresh, empty PostgreSQL databases, dropped at the end of the test."""
    created: list[str] = []

    def make() -> str:
        created.append(create_database(PG_ADMIN_URL, "orders_test"))
        return with_database(postgres_server, created[-1])

    yield make
    drop_databases(PG_ADMIN_URL, created)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'orders.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database of the parametrised backend."""
    if backend == "postgres":
        return str(request.getfixturevalue("make_pg_database")())
    return str(request.getfixturevalue("sqlite_url"))


@pytest.fixture
def migrated_url(database_url: str) -> str:
    return apply_schema(database_url)


def fast_settings(**overrides: Any) -> Settings:
    """Settings for tests: any free port, quick polls and retries."""
    base = Settings(
        port=0,
        health_interval_s=0.2,
        poll_interval_s=0.2,
        retry_base_s=0.05,
        retry_max_s=0.5,
        breaker_reset_s=0.5,
        grace_period_s=2.0,
        migrate_on_start="always",
    )
    return replace(base, **overrides)


class InProcessServer:
    def __init__(self, service: bootstrap.Service) -> None:
        self.service = service
        self.address = f"127.0.0.1:{service.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stubs = Stubs(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.service.stop(grace=1.0)


@pytest.fixture
def start_server() -> Iterator[Callable[..., InProcessServer]]:
    """Factory: a real gRPC server (this process) on a free port with the given settings."""
    started: list[InProcessServer] = []

    def start(**overrides: Any) -> InProcessServer:
        service = bootstrap.build(fast_settings(**overrides))
        service.start()
        server = InProcessServer(service)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.close()


@pytest.fixture
def server(database_url: str, start_server: Callable[..., InProcessServer]) -> InProcessServer:
    # database_url first: fixtures tear down in reverse, so the server stops before its database goes.
    """A started in-process server on a fresh database of each backend."""
    return start_server(database_url=database_url)


@pytest.fixture
def spawn_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: a real `orders-server` process (args are CLI flags); stopped with SIGTERM at the end."""
    processes: list[ServerProcess] = []

    def spawn(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> ServerProcess:
        index = len(processes)
        process = ServerProcess(
            ["--port", "0", *args], server_env(env), cwd or tmp_path, tmp_path / f"server-{index}.log"
        )
        processes.append(process)
        return process

    yield spawn
    for process in processes:
        process.stop()
