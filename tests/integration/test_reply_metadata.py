"""The correlation id's echo goes out with a unary call's reply (server.reply_metadata), a server
stream's before its first message, and with the first message of a stream named as one that
sends it at once: a real grpcio server with the correlation interceptor, and handlers that return,
abort, raise or send initial metadata of their own; then the real server's WatchOrder and
Health/Watch."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orders_service_api.v1 import orders_pb2 as pb

from server import reply_metadata
from server.interceptors import CorrelationInterceptor

HEADER = "x-correlation-id"


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"abort":
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
    if request == b"raise":
        raise RuntimeError("handler failed")
    if request == b"own":
        context.send_initial_metadata((("x-own", "yes"),))
    return b"ok:" + request


class _Streams:
    """A stream whose first message waits until the client has its initial metadata."""

    def __init__(self) -> None:
        self.client_has_headers = threading.Event()

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"headers first" if self.client_has_headers.wait(10) else b"headers waited for the message"


def _at_once(request: bytes, context: grpc.ServicerContext, send: Callable[[Any], None]) -> None:
    """A non-blocking stream (as WatchOrder is) that sends its first message before it returns and
    its last from another thread."""
    send(b"first")

    def rest() -> None:
        send(b"second")
        send(None)

    threading.Thread(target=rest).start()


_at_once.experimental_non_blocking = True  # type: ignore[attr-defined]
_at_once.experimental_thread_pool = None  # type: ignore[attr-defined]


@pytest.fixture
def served() -> Iterator[tuple[grpc.Channel, _Streams]]:
    streams = _Streams()
    handlers = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Stream": grpc.unary_stream_rpc_method_handler(streams.stream),
            "AtOnce": grpc.unary_stream_rpc_method_handler(_at_once),
        },
    )
    interceptor = CorrelationInterceptor(first_message_at_once={"/test.Echo/AtOnce"})
    server = grpc.server(ThreadPoolExecutor(4), handlers=[handlers], interceptors=[interceptor])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, streams
    finally:
        server.stop(None)


def _call(channel: grpc.Channel, request: bytes, correlation_id: str) -> tuple[Any, dict[str, str]]:
    unary = channel.unary_unary("/test.Echo/Unary")
    try:
        response, call = unary.with_call(request, metadata=[(HEADER, correlation_id)], timeout=10)
    except grpc.RpcError as error:
        return error.code(), dict(error.initial_metadata())
    return response, dict(call.initial_metadata())


@pytest.fixture
def batches_of_their_own(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every `send_initial_metadata` that grpcio's servicer context was asked for."""
    sent: list[Any] = []
    real: Callable[..., None] = grpc._server._Context.send_initial_metadata

    def counting(self: Any, metadata: Any) -> None:
        sent.append(tuple(metadata))
        real(self, metadata)

    monkeypatch.setattr(grpc._server._Context, "send_initial_metadata", counting)
    return sent


def test_this_grpcio_takes_the_wrap() -> None:
    assert reply_metadata.install()
    assert reply_metadata._installed is not None


def test_a_unary_reply_carries_the_id_without_a_batch_of_its_own(served, batches_of_their_own) -> None:
    channel, _ = served

    response, headers = _call(channel, b"hello", "echo-42")

    assert response == b"ok:hello"
    assert headers[HEADER] == "echo-42"
    assert batches_of_their_own == []


def test_an_aborted_or_failed_call_still_has_the_id_in_its_initial_metadata(served) -> None:
    channel, _ = served

    aborted, aborted_headers = _call(channel, b"abort", "echo-abort")
    failed, failed_headers = _call(channel, b"raise", "echo-raise")

    assert aborted == grpc.StatusCode.INVALID_ARGUMENT
    assert aborted_headers[HEADER] == "echo-abort"
    assert failed == grpc.StatusCode.UNKNOWN
    assert failed_headers[HEADER] == "echo-raise"


def test_initial_metadata_a_handler_sends_itself_goes_out_with_the_id(served) -> None:
    channel, _ = served

    response, headers = _call(channel, b"own", "echo-own")

    assert response == b"ok:own"
    assert (headers[HEADER], headers["x-own"]) == ("echo-own", "yes")


def test_a_server_stream_sends_the_id_before_its_first_message(served) -> None:
    channel, streams = served
    call = channel.unary_stream("/test.Echo/Stream")(b"", metadata=[(HEADER, "echo-stream")], timeout=20)

    headers = dict(call.initial_metadata())
    streams.client_has_headers.set()

    assert headers[HEADER] == "echo-stream"
    assert list(call) == [b"headers first"]


def test_a_stream_named_as_answering_at_once_sends_the_id_with_its_first_message(
    served, batches_of_their_own
) -> None:
    channel, _ = served
    call = channel.unary_stream("/test.Echo/AtOnce")(b"", metadata=[(HEADER, "echo-at-once")], timeout=10)

    assert list(call) == [b"first", b"second"]
    assert dict(call.initial_metadata())[HEADER] == "echo-at-once"
    assert batches_of_their_own == []


def test_the_servers_watch_streams_send_the_id_with_their_first_message(server, batches_of_their_own) -> None:
    placed = server.stubs.place("ann", [("SKU-1", 1)])
    watch = server.stubs.orders.WatchOrder(
        pb.WatchOrderRequest(order_id=placed.order_id), metadata=[(HEADER, "echo-watch")], timeout=10
    )
    health = health_pb2_grpc.HealthStub(server.channel).Watch(
        health_pb2.HealthCheckRequest(service=""), metadata=[(HEADER, "echo-health")], timeout=10
    )

    first_order = next(watch)
    first_status = next(health)
    health.cancel()
    watch.cancel()

    assert first_order.order.order_id == placed.order_id
    assert first_status.status == health_pb2.HealthCheckResponse.SERVING
    assert dict(watch.initial_metadata())[HEADER] == "echo-watch"
    assert dict(health.initial_metadata())[HEADER] == "echo-health"
    assert batches_of_their_own == []


def test_where_the_wrap_is_not_installed_the_id_is_sent_at_once(
    served, batches_of_their_own, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel, _ = served
    monkeypatch.setattr(reply_metadata, "_installed", None)

    response, headers = _call(channel, b"hello", "echo-fallback")

    assert response == b"ok:hello"
    assert headers[HEADER] == "echo-fallback"
    assert batches_of_their_own == [((HEADER, "echo-fallback"),)]
