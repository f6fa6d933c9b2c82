"""What a real `orders-server` process prints (DESIGN.md, "Observability"; API.md, "Metadata").

- `ORDERS_LOG_FORMAT=json`: every line, from `migrate` to the last line after SIGTERM, is one JSON
  object with `time`, `level`, `message`, `correlation_id` and `order_id`; the lines of a PlaceOrder
  call and of the saga steps it triggers carry that order's id.
- The text format carries `correlation_id=` and `order_id=` on every line.
- No line holds a request's payload (the customer id of a placed order) or a secret (the page-token
  key, given as a flag or an environment variable).
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from orders_service_api.v1 import orders_pb2 as pb

from tests.support import (
    ServerProcess,
    Stubs,
    run_cli,
    server_command,
    server_env,
    wait_until,
)

pytestmark = pytest.mark.e2e

LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
TEXT_IDS = re.compile(r" correlation_id=(?P<correlation_id>\S+) order_id=(?P<order_id>\S+) ")


@dataclass(frozen=True)
class Activity:
    """What `exercise` did: the ids to look for in the log, and the values that must not be there."""

    correlation_id: str
    order_id: str
    customer_id: str
    failed_order_id: str


def exercise(stubs: Stubs) -> Activity:
    """Every kind of call and both saga outcomes, with a customer id that appears nowhere else."""
    customer = f"customer-{secrets.token_hex(8)}"
    correlation_id = f"logs-{uuid.uuid4().hex[:12]}"
    request_id = f"request-{uuid.uuid4().hex[:12]}"
    stubs.set_stock("LOG-SKU", 10)
    response = stubs.orders.PlaceOrder(
        pb.PlaceOrderRequest(
            customer_id=customer, items=[pb.OrderItem(sku="LOG-SKU", quantity=2)], request_id=request_id
        ),
        metadata=[("x-correlation-id", correlation_id)],
        timeout=10,
    )
    order_id = response.order.order_id
    failed = stubs.place(customer, [("LOG-NO-SUCH-SKU", 1)])
    wait_until(
        lambda: all(stubs.get(o).status != pb.ORDER_STATUS_PENDING for o in (order_id, failed.order_id)),
        what=f"{order_id} and {failed.order_id} settled",
    )
    assert list(stubs.orders.WatchOrder(pb.WatchOrderRequest(order_id=failed.order_id), timeout=10))
    first = stubs.orders.ListOrders(pb.ListOrdersRequest(customer_id=customer, page_size=1), timeout=10)
    stubs.orders.ListOrders(
        pb.ListOrdersRequest(customer_id=customer, page_size=1, page_token=first.next_page_token), timeout=10
    )
    stubs.orders.CancelOrder(pb.CancelOrderRequest(order_id=order_id), timeout=10)
    wait_until(lambda: stubs.stock("LOG-SKU").reserved == 0, what="the cancelled order's stock released")
    refused = [
        lambda: stubs.place(customer, [("LOG-SKU", 3)], request_id=request_id),  # FAILED_PRECONDITION
        lambda: stubs.place(customer, [("LOG-SKU", 0)]),  # INVALID_ARGUMENT
        lambda: stubs.get(str(uuid.uuid4())),  # NOT_FOUND
        lambda: stubs.orders.ListOrders(  # INVALID_ARGUMENT: a token of another query
            pb.ListOrdersRequest(customer_id="someone-else", page_token=first.next_page_token), timeout=10
        ),
    ]
    for call in refused:
        with pytest.raises(grpc.RpcError):
            call()
    return Activity(correlation_id, order_id, customer, failed.order_id)


def migrate_sqlite(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = run_cli("migrate", env=env, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def assert_nothing_leaks(lines: list[str], *values: str, where: str = "the log") -> None:
    for value in values:
        leaking = [line for line in lines if value in line]
        assert not leaking, f"{value!r} appears in {where}:\n" + "\n".join(leaking[:5])


def test_json_logs_are_one_object_per_line_with_ids_and_no_payload_or_secret(
    spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    # A URL-safe secret may begin with "-": as an argument of its own argparse would take it for
    # an option (this test failed so once in 64 runs); `--flag=value` is how such a value is given.
    secret = "-" + secrets.token_urlsafe(24)
    env = {"ORDERS_LOG_FORMAT": "json"}
    migrated = migrate_sqlite(tmp_path, env)
    server = spawn_server(f"--page-token-secret={secret}", env=env)

    activity = exercise(server.stubs)
    assert server.stop() == 0

    lines = (migrated.stdout + migrated.stderr + server.log()).splitlines()
    entries: list[dict[str, Any]] = []
    for line in lines:
        entry = json.loads(line)  # every line, not only most of them
        assert isinstance(entry, dict), line
        assert {"time", "level", "message", "correlation_id", "order_id"} <= entry.keys(), line
        datetime.fromisoformat(entry["time"])
        assert entry["level"] in LEVELS, line
        assert all(isinstance(entry[k], str) and entry[k] for k in ("correlation_id", "order_id")), line
        entries.append(entry)
    messages = [e["message"] for e in entries]
    assert any("schema migrated" in m for m in messages), "migrate logs in JSON too"
    assert any(m.startswith("orders-server ready on") for m in messages)
    assert messages[-1] == "orders-server stopped"

    # The call and every saga step it triggered carry its correlation id and its order id.
    of_the_call = [e for e in entries if e["correlation_id"] == activity.correlation_id]
    assert any("/PlaceOrder code=OK" in e["message"] for e in of_the_call), of_the_call
    assert any(e["message"] == f"order {activity.order_id} is VALIDATED" for e in of_the_call), of_the_call
    assert {e["order_id"] for e in of_the_call} == {activity.order_id}
    saga_of_failed = [
        e for e in entries if e["logger"] == "orders.saga" and activity.failed_order_id in e["message"]
    ]
    assert saga_of_failed and {e["order_id"] for e in saga_of_failed} == {activity.failed_order_id}
    cancel = [e for e in entries if "/CancelOrder code=OK" in e["message"]]
    assert [e["order_id"] for e in cancel] == [activity.order_id]
    # Lines outside any request say so with "-", never with another call's ids.
    assert {e["correlation_id"] for e in entries if e["message"].startswith("orders-server")} == {"-"}

    assert_nothing_leaks(lines, activity.customer_id, secret)


def test_text_logs_carry_both_ids_on_every_line_and_no_payload_or_secret(
    spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    secret = secrets.token_urlsafe(24)
    server = spawn_server(env={"ORDERS_PAGE_TOKEN_SECRET": secret})

    activity = exercise(server.stubs)
    assert server.stop() == 0

    lines = server.log().splitlines()
    assert lines
    without = [line for line in lines if not TEXT_IDS.search(line)]
    assert not without, "lines without correlation_id= and order_id=:\n" + "\n".join(without[:5])
    ids = [m.groupdict() for line in lines if (m := TEXT_IDS.search(line))]
    assert {d["order_id"] for d in ids if d["correlation_id"] == activity.correlation_id} == {
        activity.order_id
    }
    assert_nothing_leaks(lines, activity.customer_id, secret)


def test_help_does_not_print_secrets_taken_from_the_environment(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(24)
    password = secrets.token_hex(8)
    env = {
        "ORDERS_PAGE_TOKEN_SECRET": secret,
        "ORDERS_DATABASE_URL": f"postgresql://orders:{password}@db.internal:5432/orders",
        "ORDERS_REDIS_URL": f"redis://:{password}@cache.internal:6379/0",
    }
    done = subprocess.run(
        [*server_command(), "--help"], env=server_env(env), cwd=tmp_path,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert_nothing_leaks(done.stdout.splitlines(), secret, password, where="--help")
