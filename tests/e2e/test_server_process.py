"""A real `orders-server` process, started the README's way, on SQLite and on PostgreSQL.

SQLite: no configuration at all (the embedded default under ./var/ of the working directory).
PostgreSQL: `ORDERS_DATABASE_URL=postgresql://... orders-server migrate`, then `orders-server`.
The only flag the tests add is `--port 0`, so that runs never collide on 50051.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict, Unpack

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orders_service_api.v1 import orders_pb2 as pb
from sqlalchemy import create_engine, inspect

from server.config import Settings
from tests.local_services import signal_another_thread
from tests.support import (
    ServerProcess,
    Stubs,
    run_cli,
    wait_until,
)

pytestmark = pytest.mark.e2e

# The text log format of server/logs.py: "... [thread] logger correlation_id=... order_id=... message".
LOG_LINE = re.compile(
    r"\[(?P<thread>[^\]]+)\] (?P<logger>\S+) correlation_id=(?P<correlation_id>\S+) "
    r"order_id=(?P<order_id>\S+) (?P<message>.*)"
)


def plain_postgresql(url: str) -> str:
    """The README's spelling: `postgresql://` (psycopg2 by default) rather than `+psycopg2`."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


def run_migrate(url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("migrate", env={"ORDERS_DATABASE_URL": url}, cwd=cwd)


@pytest.fixture
def readme_server(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> ServerProcess:
    """One `orders-server` process on a fresh database of each backend, started as the README says."""
    if backend == "postgres":
        # Asked for before spawn_server, so the database is dropped after the process has stopped.
        url = plain_postgresql(request.getfixturevalue("make_pg_database")())
        migrated = run_migrate(url, tmp_path)
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        spawn: Callable[..., ServerProcess] = request.getfixturevalue("spawn_server")
        return spawn(env={"ORDERS_DATABASE_URL": url})
    spawn = request.getfixturevalue("spawn_server")
    return spawn()


def health_status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def status_of(stubs: Stubs, order_id: str) -> int:
    return int(stubs.get(order_id).status)


def wait_for_status(stubs: Stubs, order_id: str, status: int) -> None:
    wait_until(
        lambda: status_of(stubs, order_id) == status,
        what=f"order {order_id} to become {pb.OrderStatus.Name(status)}",
    )


class ListFilters(TypedDict, total=False):
    """What a ListOrdersRequest can select on."""

    customer_id: str
    status: pb.OrderStatus


def every_page(stubs: Stubs, **filters: Unpack[ListFilters]) -> list[list[pb.Order]]:
    pages: list[list[pb.Order]] = []
    token = ""
    while True:
        response = stubs.orders.ListOrders(
            pb.ListOrdersRequest(page_size=2, page_token=token, **filters), timeout=10
        )
        pages.append(list(response.orders))
        token = response.next_page_token
        if not token:
            return pages
        assert len(pages) < 10, "ListOrders keeps issuing page tokens"


def log_lines(process: ServerProcess) -> list[re.Match[str]]:
    return [m for line in process.log().splitlines() if (m := LOG_LINE.search(line))]


def echoed_id(call: grpc.Call) -> str:
    return str(dict(call.initial_metadata())["x-correlation-id"])


def is_uuid4(value: str) -> bool:
    try:
        return uuid.UUID(value).version == 4 and str(uuid.UUID(value)) == value
    except ValueError:
        return False


def test_an_order_is_validated_listed_page_by_page_and_cancelled_with_its_stock_back(
    readme_server: ServerProcess,
) -> None:
    stubs = readme_server.stubs
    assert stubs.set_stock("E2E-WIDGET", 100).available == 100

    placed = []
    for quantity in range(1, 6):
        order = stubs.place("e2e-alice", [("E2E-WIDGET", quantity)])
        assert (order.status, order.version) == (pb.ORDER_STATUS_PENDING, 1)
        placed.append(order.order_id)
    unknown = stubs.place("e2e-bob", [("E2E-NO-SUCH-SKU", 1)])
    assert unknown.status == pb.ORDER_STATUS_PENDING

    for order_id in placed:
        wait_for_status(stubs, order_id, pb.ORDER_STATUS_VALIDATED)
    wait_for_status(stubs, unknown.order_id, pb.ORDER_STATUS_FAILED)
    assert "E2E-NO-SUCH-SKU" in stubs.get(unknown.order_id).failure_reason
    stock = stubs.stock("E2E-WIDGET")
    assert (stock.available, stock.reserved) == (100 - 15, 15)

    newest_first = list(reversed(placed))
    searches: list[ListFilters] = [{"customer_id": "e2e-alice"}, {"status": pb.ORDER_STATUS_VALIDATED}]
    for filters in searches:
        pages = every_page(stubs, **filters)
        assert [len(page) for page in pages] == [2, 2, 1], filters
        listed = [order.order_id for page in pages for order in page]
        assert listed == newest_first, filters
        keys = [(o.create_time.ToDatetime(), o.order_id) for page in pages for o in page]
        assert keys == sorted(keys, reverse=True), filters
    assert [[o.order_id for o in page] for page in every_page(stubs, status=pb.ORDER_STATUS_FAILED)] == [
        [unknown.order_id]
    ]

    cancelled = stubs.orders.CancelOrder(pb.CancelOrderRequest(order_id=placed[2]), timeout=10).order
    assert (cancelled.status, cancelled.version) == (pb.ORDER_STATUS_CANCELLED, 3)
    wait_until(
        lambda: (s := stubs.stock("E2E-WIDGET")).available == 100 - 12 and s.reserved == 12,
        what="the cancelled order's 3 widgets back in stock",
    )
    assert status_of(stubs, placed[2]) == pb.ORDER_STATUS_CANCELLED


def test_a_correlation_id_is_echoed_and_stamped_on_the_call_and_on_its_saga_steps(
    readme_server: ServerProcess,
) -> None:
    stubs = readme_server.stubs
    stubs.set_stock("E2E-CORR", 5)
    correlation_id = f"e2e-corr:{uuid.uuid4().hex[:12]}"
    request = pb.PlaceOrderRequest(customer_id="e2e-carol", items=[pb.OrderItem(sku="E2E-CORR", quantity=2)])

    response, call = stubs.orders.PlaceOrder.with_call(
        request, metadata=[("x-correlation-id", correlation_id)], timeout=10
    )

    order_id = response.order.order_id
    assert echoed_id(call) == correlation_id
    wait_for_status(stubs, order_id, pb.ORDER_STATUS_VALIDATED)

    def saga_lines() -> list[re.Match[str]]:
        return [
            m
            for m in log_lines(readme_server)
            if m["order_id"] == order_id and re.fullmatch(r"saga_\d+", m["thread"])
        ]

    wait_until(
        lambda: any("VALIDATED" in m["message"] for m in saga_lines()),
        what="the saga's log line of the VALIDATED order",
    )
    assert {m["correlation_id"] for m in saga_lines()} == {correlation_id}
    [access] = [m for m in log_lines(readme_server) if "/orders.v1.OrderService/PlaceOrder" in m["message"]]
    assert access["correlation_id"] == correlation_id
    assert access["thread"].startswith("grpc")


@pytest.mark.parametrize(
    "metadata",
    [[], [("x-correlation-id", "bad id with spaces")]],
    ids=["without-a-header", "with-an-invalid-header"],
)
def test_a_call_without_a_valid_correlation_id_gets_a_new_uuid_on_the_wire_and_in_the_log(
    readme_server: ServerProcess, metadata: list[tuple[str, str]]
) -> None:
    _, call = readme_server.stubs.inventory.SetStock.with_call(
        pb.SetStockRequest(sku="E2E-NEW-ID", available=1), metadata=metadata, timeout=10
    )

    made = echoed_id(call)
    assert is_uuid4(made)

    def lines_of_the_call() -> list[re.Match[str]]:
        lines = log_lines(readme_server)
        return [m for m in lines if m["correlation_id"] == made and "SetStock" in m["message"]]

    wait_until(lines_of_the_call, what=f"the SetStock log line with correlation_id={made}")
    assert "bad id with spaces" not in readme_server.log()


def test_sigterm_stops_the_process_with_exit_code_0_and_a_final_stopped_line(
    readme_server: ServerProcess,
) -> None:
    stubs = readme_server.stubs
    stubs.set_stock("E2E-STOP", 1)
    order = stubs.place("e2e-dave", [("E2E-STOP", 1)])
    wait_for_status(stubs, order.order_id, pb.ORDER_STATUS_VALIDATED)

    code = readme_server.stop(signal.SIGTERM)

    assert code == 0, readme_server.log()
    lines = readme_server.log().strip().splitlines()
    assert "orders-server stopped" in lines[-1], lines[-3:]
    assert not [line for line in lines if "Traceback" in line or " ERROR " in line], readme_server.log()


def test_sigterm_delivered_to_a_thread_other_than_the_main_one_stops_the_process(
    spawn_server: Callable[..., ServerProcess], sqlite_url: str
) -> None:
    """A process-directed signal may reach any thread; the handler must still run in the main one."""
    server = spawn_server("--database-url", sqlite_url)
    server.stubs.set_stock("E2E-TGKILL", 1)

    signal_another_thread(server.proc.pid, signal.SIGTERM)

    assert server.proc.wait(timeout=10) == 0, server.log()  # TimeoutExpired: it went on
    assert "received SIGTERM: shutting down" in server.log()


def test_help_lists_every_setting_as_a_flag_and_an_orders_environment_variable(tmp_path: Path) -> None:
    done = run_cli("--help", cwd=tmp_path, timeout=60)

    assert done.returncode == 0, done.stderr
    text = done.stdout
    missing = [
        name
        for setting in dataclasses.fields(Settings)
        for name in ("--" + setting.name.replace("_", "-"), "ORDERS_" + setting.name.upper())
        if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)
    ]
    assert not missing, f"orders-server --help does not mention {missing}:\n{text}"
    assert "migrate" in text
    assert "127.0.0.1" in text and "50051" in text, "the defaults are shown"


def test_with_no_configuration_the_server_makes_its_sqlite_file_under_var_and_takes_orders(
    spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    home = tmp_path / "fresh-checkout"
    home.mkdir()

    server = spawn_server(cwd=home)  # no ORDERS_* variable, no flag but --port 0

    assert re.search(r"orders-server ready on 127\.0\.0\.1:\d+ \(database: sqlite, plaintext\)", server.log())
    assert (home / "var" / "orders.db").is_file()
    wait_until(
        lambda: health_status(server.channel) == health_pb2.HealthCheckResponse.SERVING,
        what="health SERVING",
    )
    assert health_status(server.channel, "orders.v1.OrderService") == health_pb2.HealthCheckResponse.SERVING
    server.stubs.set_stock("E2E-FIRST", 2)
    order = server.stubs.place("e2e-first", [("E2E-FIRST", 2)])
    wait_for_status(server.stubs, order.order_id, pb.ORDER_STATUS_VALIDATED)


@pytest.mark.postgres
def test_migrate_on_an_empty_postgresql_database_exits_0_and_a_second_run_changes_nothing(
    make_pg_database: Callable[[], str], tmp_path: Path
) -> None:
    admin_url = make_pg_database()
    url = plain_postgresql(admin_url)

    first = run_migrate(url, tmp_path)

    assert first.returncode == 0, first.stdout + first.stderr
    assert "orders schema migrated from nothing" in first.stderr
    assert "inventory schema migrated from nothing" in first.stderr
    engine = create_engine(admin_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"orders", "order_items", "outbox_events", "stock", "stock_reservations"} <= tables

    second = run_migrate(url, tmp_path)

    assert second.returncode == 0, second.stdout + second.stderr
    assert "schema migrated" not in second.stderr
    assert "migrations applied" in second.stderr


@pytest.mark.postgres
def test_on_an_unmigrated_postgresql_database_the_server_is_not_serving_and_says_to_migrate(
    make_pg_database: Callable[[], str], spawn_server: Callable[..., ServerProcess]
) -> None:
    url = plain_postgresql(make_pg_database())

    server = spawn_server(env={"ORDERS_DATABASE_URL": url})

    assert health_status(server.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "run `orders-server migrate`" in server.log()


@pytest.mark.postgres
def test_the_default_page_token_secret_on_postgresql_is_warned_about_at_start(
    make_pg_database: Callable[[], str], spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    url = plain_postgresql(make_pg_database())
    migrated = run_migrate(url, tmp_path)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr

    default = spawn_server(env={"ORDERS_DATABASE_URL": url})
    own = spawn_server(env={"ORDERS_DATABASE_URL": url, "ORDERS_PAGE_TOKEN_SECRET": "an operator's own"})
    embedded = spawn_server()  # the SQLite demo default: no deployment to warn

    warned = [line for line in default.log().splitlines() if "--page-token-secret" in line]
    assert len(warned) == 1 and "WARNING" in warned[0], default.log()
    assert Settings().page_token_secret not in default.log()
    assert "--page-token-secret" not in own.log()
    assert "--page-token-secret" not in embedded.log()
