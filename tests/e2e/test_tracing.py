"""OpenTelemetry tracing on real `orders-server` processes (docs/operations.md, "Tracing").

Each server writes the spans it finishes to a file of its own (`--otel-test-span-file`, the SDK's
span JSON, one a line; tests only): what a test reads there is what an exporter would have sent.

- One PlaceOrder is one trace: the RPC's SERVER span in the process that took the call, and the
  saga step's CONSUMER span, its child, in another process that ran the saga after the first one
  had stopped (the trace context travels in the outbox event's headers).
- A caller's `traceparent` / `tracestate` is honoured (same trace, the caller's span as parent)
  and answered (`traceresponse` in the initial metadata, beside `x-correlation-id`).
- Log lines carry the trace id, text and JSON alike.
- Health/Watch and WatchOrder still stream, off the handler threads, with tracing on.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orders_service_api.v1 import orders_pb2 as pb

from tests.support import Stubs, migrate_database, server_env, wait_until

pytestmark = pytest.mark.e2e

FAST = ("--poll-interval-s", "0.2", "--health-interval-s", "0.2", "--grace-period-s", "2")
PLACE = "orders.v1.OrderService/PlaceOrder"
TRACE_RESPONSE = re.compile(r"00-(?P<trace_id>[0-9a-f]{32})-(?P<span_id>[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})")

Span = dict[str, Any]


def read_spans(path: Path) -> list[Span]:
    """The spans a server has written so far (a line still being written is left for later)."""
    if not path.exists():
        return []
    spans = []
    for line in path.read_text().splitlines():
        try:
            spans.append(json.loads(line))
        except ValueError:
            continue
    return spans


def trace_id(span: Span) -> str:
    return str(span["context"]["trace_id"]).removeprefix("0x")


def span_id(span: Span) -> str:
    return str(span["context"]["span_id"]).removeprefix("0x")


def spans_named(path: Path, name: str, trace: str | None = None) -> list[Span]:
    return [s for s in read_spans(path) if s["name"] == name and (trace is None or trace_id(s) == trace)]


def place_with_call(
    stubs: Stubs, sku: str, metadata: list[tuple[str, str]]
) -> tuple[pb.Order, dict[str, str]]:
    """PlaceOrder with `metadata`; the order and the initial metadata the server answered."""
    request = pb.PlaceOrderRequest(customer_id="tracing", items=[pb.OrderItem(sku=sku, quantity=1)])
    response, call = stubs.orders.PlaceOrder.with_call(request, metadata=metadata, timeout=10)
    return response.order, {item.key: item.value for item in call.initial_metadata()}


def answered_trace(initial_metadata: dict[str, str]) -> re.Match[str]:
    match = TRACE_RESPONSE.fullmatch(initial_metadata.get("traceresponse", ""))
    assert match is not None, initial_metadata
    return match


@pytest.mark.postgres
def test_one_place_order_is_one_trace_across_two_processes_and_a_restart(
    spawn_server, make_pg_database, tmp_path
):
    url = make_pg_database()
    migrate_database(url)
    api_spans, saga_spans = tmp_path / "api-spans.jsonl", tmp_path / "saga-spans.jsonl"
    # The process that takes the calls runs no saga, and stops before the one that does starts.
    api = spawn_server(
        "--database-url", url, "--saga-workers", "0", "--otel-test-span-file", str(api_spans), *FAST
    )
    api.stubs.set_stock("TRACE-1", 10)
    correlation_id = f"trace-{uuid.uuid4().hex[:12]}"
    order, answered = place_with_call(api.stubs, "TRACE-1", [("x-correlation-id", correlation_id)])
    trace = answered_trace(answered)["trace_id"]
    assert answered["x-correlation-id"] == correlation_id
    assert api.stop() == 0

    saga = spawn_server("--database-url", url, "--otel-test-span-file", str(saga_spans), *FAST)
    wait_until(lambda: saga.stubs.get(order.order_id).status == pb.ORDER_STATUS_VALIDATED, what="validated")
    steps = wait_until(lambda: spans_named(saga_spans, "saga ORDER_CREATED", trace), what="the saga span")

    (rpc,) = spans_named(api_spans, PLACE, trace)
    assert rpc["kind"] == "SpanKind.SERVER"
    assert rpc["parent_id"] is None  # the caller sent no traceparent: a new trace
    assert rpc["attributes"]["rpc.system"] == "grpc"
    assert rpc["attributes"]["rpc.grpc.status_code"] == 0
    assert rpc["attributes"]["orders.order_id"] == order.order_id
    assert rpc["attributes"]["orders.correlation_id"] == correlation_id
    (step,) = steps
    assert step["kind"] == "SpanKind.CONSUMER"
    assert step["parent_id"] == rpc["context"]["span_id"]
    assert step["attributes"]["orders.order_id"] == order.order_id
    assert step["attributes"]["orders.correlation_id"] == correlation_id
    assert step["attributes"]["orders.saga.verdict"] == "done"
    assert not spans_named(api_spans, "saga ORDER_CREATED")  # the API process ran no saga
    assert rpc["resource"]["attributes"]["service.name"] == "orders-service"
    # The saga's log lines carry the same trace id and correlation id as the call's.
    call_line = f"correlation_id={correlation_id} order_id={order.order_id} trace_id={trace} rpc /{PLACE}"
    assert call_line in api.log()
    saga_line = f"correlation_id={correlation_id} order_id={order.order_id} trace_id={trace} order "
    assert saga_line in saga.log()


@pytest.mark.postgres
def test_orders_waiting_for_the_saga_run_as_a_batch_linked_to_each_trace(
    spawn_server, make_pg_database, tmp_path
):
    url = make_pg_database()
    migrate_database(url)
    api_spans, saga_spans = tmp_path / "api-spans.jsonl", tmp_path / "saga-spans.jsonl"
    api = spawn_server(
        "--database-url", url, "--saga-workers", "0", "--otel-test-span-file", str(api_spans), *FAST
    )
    api.stubs.set_stock("TRACE-B", 100)
    placed = [place_with_call(api.stubs, "TRACE-B", []) for _ in range(5)]
    traces = {order.order_id: answered_trace(answered)["trace_id"] for order, answered in placed}
    assert api.stop() == 0

    saga = spawn_server("--database-url", url, "--otel-test-span-file", str(saga_spans), *FAST)
    wait_until(
        lambda: all(saga.stubs.get(o).status == pb.ORDER_STATUS_VALIDATED for o in traces),
        what="all validated",
    )

    def every_order_stepped() -> list[Span] | None:
        steps = spans_named(saga_spans, "saga ORDER_CREATED")
        return steps if {s["attributes"]["orders.order_id"] for s in steps} >= set(traces) else None

    steps = wait_until(every_order_stepped, what="a saga span for every order")
    rpcs = {s["attributes"]["orders.order_id"]: s for s in spans_named(api_spans, PLACE)}
    for step in steps:
        order_id = step["attributes"]["orders.order_id"]
        assert trace_id(step) == traces[order_id]
        assert step["parent_id"] == rpcs[order_id]["context"]["span_id"]
    # They were waiting together: one round claimed them and ran them as one batch, a span of its
    # own linked to each order's trace, and each order's span links back to it.
    (batch,) = spans_named(saga_spans, "saga ORDER_CREATED batch")
    assert {link["context"]["trace_id"].removeprefix("0x") for link in batch["links"]} == set(traces.values())
    assert batch["attributes"]["orders.batch.size"] == 5
    assert all(step["links"][0]["context"]["span_id"] == batch["context"]["span_id"] for step in steps)


def test_a_callers_traceparent_is_honoured_answered_and_kept_in_the_outbox(spawn_server, tmp_path):
    spans = tmp_path / "spans.jsonl"
    database = tmp_path / "orders.db"
    server = spawn_server(
        "--database-url", f"sqlite:///{database}", "--saga-workers", "0", "--otel-test-span-file", str(spans)
    )
    caller_trace, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    metadata = [
        ("traceparent", f"00-{caller_trace}-{caller_span}-01"),
        ("tracestate", "shop=checkout"),
        ("x-correlation-id", "traced-caller-1"),
    ]

    order, answered = place_with_call(server.stubs, "TRACE-2", metadata)

    answer = answered_trace(answered)
    assert answer["trace_id"] == caller_trace
    assert answer["span_id"] != caller_span  # the server's own span, the caller's child
    assert answer["flags"] == "01"
    assert answered["x-correlation-id"] == "traced-caller-1"
    (rpc,) = wait_until(lambda: spans_named(spans, PLACE, caller_trace), what="the PlaceOrder span")
    assert rpc["parent_id"] == f"0x{caller_span}"
    assert span_id(rpc) == answer["span_id"]
    assert "shop" in rpc["context"]["trace_state"]
    # The outbox event carries the server span's context beside the correlation id.
    with sqlite3.connect(database) as connection:
        (raw,) = connection.execute(
            "SELECT headers FROM outbox_events WHERE aggregate_id = ?", (order.order_id,)
        ).fetchone()
    headers = json.loads(raw)
    assert headers["correlation_id"] == "traced-caller-1"
    assert headers["traceparent"] == f"00-{caller_trace}-{answer['span_id']}-01"
    assert headers["tracestate"] == "shop=checkout"


def test_json_log_lines_carry_the_trace_id(spawn_server, tmp_path):
    server = spawn_server("--otel-exporter", "console", env={"ORDERS_LOG_FORMAT": "json"})
    caller_trace = uuid.uuid4().hex
    place_with_call(
        server.stubs, "TRACE-3", [("traceparent", f"00-{caller_trace}-{uuid.uuid4().hex[:16]}-01")]
    )

    def access_line() -> dict[str, Any] | None:
        for line in server.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # still being written
                continue
            # The console exporter's spans (stdout) are in the same file here: they have no message.
            if entry.get("message", "").startswith(f"rpc /{PLACE} code=OK"):
                return dict(entry)
        return None

    entry = wait_until(access_line, what="the PlaceOrder access line")
    assert entry["trace_id"] == caller_trace
    assert re.fullmatch(r"[0-9a-f]{16}", entry["span_id"])
    ready = next(json.loads(line) for line in server.log().splitlines() if "orders-server ready on" in line)
    assert ready["trace_id"] == "-"  # outside any span


def test_health_watch_and_watch_order_stream_off_the_handler_threads_with_tracing_on(spawn_server, tmp_path):
    spans = tmp_path / "spans.jsonl"
    server = spawn_server("--max-workers", "2", "--otel-test-span-file", str(spans), *FAST)
    server.stubs.set_stock("TRACE-W", 100)
    health = health_pb2_grpc.HealthStub(server.channel)
    # More open streams of each kind than there are handler threads: they hold none.
    health_watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(4)]
    assert {next(w).status for w in health_watches} == {health_pb2.HealthCheckResponse.SERVING}
    orders = [server.stubs.place("watched", [("NO-SUCH-SKU", 1)]) for _ in range(4)]
    watches = [
        server.stubs.orders.WatchOrder(pb.WatchOrderRequest(order_id=o.order_id), timeout=30) for o in orders
    ]
    for watch in watches:
        statuses = [response.order.status for response in watch]  # ends once the order has settled
        assert statuses[-1] == pb.ORDER_STATUS_FAILED
        # The headers went out with the first message (server.reply_metadata), trace answer and all.
        headers = {item.key: item.value for item in watch.initial_metadata()}
        assert headers["x-correlation-id"], headers
        answered_trace(headers)
    assert all(dict(w.initial_metadata()).get("x-correlation-id") for w in health_watches)
    assert server.stubs.stock("TRACE-W").available == 100  # unary calls still have their threads
    for watch in health_watches:
        watch.cancel()

    # A WatchOrder's span ends with the stream, OK; health is not traced.
    def watch_spans() -> list[Span] | None:
        found = spans_named(spans, "orders.v1.OrderService/WatchOrder")
        return found if len(found) == len(orders) else None

    assert {s["attributes"]["rpc.grpc.status_code"] for s in wait_until(watch_spans, what="4 spans")} == {0}
    assert not [s for s in read_spans(spans) if s["name"].startswith("grpc.health")]
    # One process on SQLite (its events handed to its own saga workers at commit): each step is
    # still the child of the PlaceOrder span that wrote its event.
    places = {s["attributes"]["orders.order_id"]: s for s in spans_named(spans, PLACE)}

    def every_step() -> dict[str, Span] | None:
        # A step's span ends once its handler has returned, which may be after the watch saw the end.
        found = {s["attributes"]["orders.order_id"]: s for s in spans_named(spans, "saga ORDER_CREATED")}
        return found if len(found) == len(orders) else None

    steps = wait_until(every_step, what="a saga span for every order")
    for order in orders:
        assert steps[order.order_id]["parent_id"] == places[order.order_id]["context"]["span_id"]
        assert steps[order.order_id]["attributes"]["orders.saga.verdict"] == "done"


def test_a_server_without_tracing_loads_neither_the_tracing_module_nor_the_trace_sdk(tmp_path):
    # (redis imports OpenTelemetry's metrics API by itself whenever it is installed, for an
    # instrumentation of its own that stays off: not this service's doing, and no tracing.)
    script = (
        "import sys\n"
        "from server import bootstrap\n"
        "from server.config import load\n"
        "_, settings = load(['--port', '0', '--database-url', sys.argv[1]], env={})\n"
        "service = bootstrap.build(settings)\n"
        "service.start()\n"
        "service.stop(grace=0.5)\n"
        "tracing = ('server.tracing', 'opentelemetry.sdk.trace', 'opentelemetry.propagate')\n"
        "print(sorted(name for name in sys.modules if name.startswith(tracing)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, f"sqlite:///{tmp_path / 'orders.db'}"],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_tracing_is_off_by_default_and_answers_no_trace(spawn_server):
    server = spawn_server()
    _, answered = place_with_call(
        server.stubs, "TRACE-4", [("traceparent", f"00-{uuid.uuid4().hex}-{'1' * 16}-01")]
    )
    assert "traceresponse" not in answered
    assert "trace_id=" not in server.log()


def test_a_callers_mistake_is_in_the_span_but_is_no_server_error(spawn_server, tmp_path):
    spans = tmp_path / "spans.jsonl"
    server = spawn_server("--otel-test-span-file", str(spans))
    with pytest.raises(grpc.RpcError) as caller_error:
        server.stubs.orders.GetOrder(pb.GetOrderRequest(order_id="not-a-uuid"), timeout=5)
    assert caller_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    (span,) = wait_until(lambda: spans_named(spans, "orders.v1.OrderService/GetOrder"), what="the span")
    assert span["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert span["status"]["status_code"] == "UNSET"  # the caller's mistake, not the server's fault
