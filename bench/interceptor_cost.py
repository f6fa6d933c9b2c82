"""CPU per call of the server's interceptor chain, without a network or a database (this thread's
CPU time, so that other processes on a shared machine change the figure little).

A unary call goes through the chain the way grpcio runs it (each interceptor's `intercept_service`,
then the wrapped behaviour) with a handler that does nothing, so what is timed is the chain alone:
correlation id, metrics, errors, and tracing when asked. Run it with and without a part to see
what that part costs a call:

    .venv/bin/python -m bench.interceptor_cost                 # the default chain (tracing off)
    .venv/bin/python -m bench.interceptor_cost --no-metrics    # without the metrics interceptor
    .venv/bin/python -m bench.interceptor_cost --tracing       # tracing on, spans sampled, no export

The access log line is off (level WARNING): its cost is the log writer's, measured elsewhere.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from server.interceptors import CorrelationInterceptor, ErrorInterceptor
from server.metrics import Metrics, MetricsInterceptor

METHOD = "/orders.v1.OrderService/GetOrder"


class _Metadatum:
    __slots__ = ("key", "value")

    def __init__(self, key: str, value: str) -> None:
        self.key, self.value = key, value


class _Details:
    def __init__(self, method: str, metadata: Sequence[_Metadatum]) -> None:
        self.method = method
        self.invocation_metadata = metadata


class _Context:
    """What the chain asks of grpcio's servicer context on a unary call that succeeds."""

    def __init__(self, metadata: Sequence[_Metadatum]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> Sequence[_Metadatum]:
        return self._metadata

    def send_initial_metadata(self, _metadata: Any) -> None:
        pass

    def time_remaining(self) -> float | None:
        return 5.0

    def code(self) -> grpc.StatusCode | None:
        return None


def _handler() -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(lambda request, context: request)


def _pipeline(interceptors: Sequence[grpc.ServerInterceptor]) -> Callable[[Any], grpc.RpcMethodHandler]:
    """grpcio's interceptor pipeline: the first interceptor is the outermost."""
    handler = _handler()

    def at(index: int) -> Callable[[Any], grpc.RpcMethodHandler]:
        if index == len(interceptors):
            return lambda _details: handler
        following = at(index + 1)
        return lambda details: interceptors[index].intercept_service(following, details)

    return at(0)


def per_call_us(interceptors: Sequence[grpc.ServerInterceptor], calls: int, traceparent: bool) -> float:
    """Microseconds of this thread's CPU per call through `interceptors`, the best of five rounds of
    `calls` (CPU time, not wall time: on a shared machine the wall clock counts other processes' turns)."""
    metadata = [_Metadatum("x-correlation-id", "bench-1")]
    if traceparent:
        metadata.append(_Metadatum("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))
    details = _Details(METHOD, metadata)
    lookup = _pipeline(interceptors)
    rounds = []
    for _ in range(5):
        started = time.thread_time()
        for _ in range(calls):
            context = _Context(metadata)
            lookup(details).unary_unary(b"", context)
        rounds.append((time.thread_time() - started) / calls * 1e6)
    return min(rounds)


def chain(metrics: bool, tracing: bool) -> list[grpc.ServerInterceptor]:
    correlation: grpc.ServerInterceptor = CorrelationInterceptor()
    if tracing:
        from server import tracing as tracing_module

        correlation = tracing_module.Tracing.for_benchmark().correlation_interceptor()
    return [
        correlation,
        *([MetricsInterceptor(Metrics())] if metrics else []),
        ErrorInterceptor(),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--no-metrics", action="store_true")
    parser.add_argument("--tracing", action="store_true", help="tracing on: spans made and sampled")
    parser.add_argument("--traceparent", action="store_true", help="calls carry a W3C traceparent")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    figures = [
        per_call_us(chain(not args.no_metrics, args.tracing), args.calls, args.traceparent) for _ in range(3)
    ]
    print(
        f"interceptor chain (metrics {'off' if args.no_metrics else 'on'}, tracing "
        f"{'on' if args.tracing else 'off'}): {statistics.median(figures):.2f} us of CPU per call "
        f"(median of {len(figures)}, each the best of 5 x {args.calls})"
    )


if __name__ == "__main__":
    main()
