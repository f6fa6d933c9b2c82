"""Prometheus metrics on a port of their own (`--metrics-port`), one registry per Service."""

from __future__ import annotations

import functools
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
import pybreaker
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from db.outbox import ClaimedEvent
from server.config import version
from server.grpc_metrics import MethodCalls, StandardGrpcMetrics, grpc_type
from server.interceptors import WrappingInterceptor, behaviour_name

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A breaker's state as a gauge's value (the inventory's here, the event relay's in server.events).
BREAKER_STATES = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}


class _FunctionCounter(Collector):
    """A counter whose value is read from a function when scraped (counts kept elsewhere)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "orders_rpc_total", "gRPC calls by method and status code", ["method", "code"], registry=r
        )
        self.rpc_latency = Histogram(
            "orders_rpc_duration_seconds",
            "gRPC call latency",
            ["method", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "orders_rpc_rejected_total",
            "gRPC calls refused at admission with RESOURCE_EXHAUSTED, by method and reason "
            "(concurrency: the handler threads' limit; stream_limit: the cap of the stream's kind)",
            ["method", "reason"],
            registry=r,
        )
        self.open_streams = Gauge("orders_open_streams", "open gRPC streams by kind", ["kind"], registry=r)
        self.backlog = Gauge("orders_outbox_backlog", "PENDING outbox events", registry=r)
        self.oldest_pending = Gauge(
            "orders_outbox_oldest_pending_seconds", "age of the oldest PENDING event", registry=r
        )
        self.dispatch_lag = Histogram(
            "orders_outbox_dispatch_lag_seconds",
            "outbox events: commit to dispatch (handed over at commit), or creation to claim",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.handled = Counter(
            "orders_outbox_events_total",
            "handled outbox events by outcome (done, retried, deferred, dead, fenced)",
            ["event_type", "outcome"],
            registry=r,
        )
        self.handler_latency = Histogram(
            "orders_outbox_handler_seconds",
            "time from claim to recorded outcome",
            ["event_type"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.saga_outcomes = Counter(
            "orders_saga_outcomes_total",
            "saga results (validated, failed, released, gave_up)",
            ["outcome"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "orders_breaker_state", "inventory breaker: 0 closed, 1 half-open, 2 open", registry=r
        )
        self.breaker_transitions = Counter(
            "orders_breaker_transitions_total", "inventory breaker state changes", ["to"], registry=r
        )
        # Counted per call, read only by the standard gRPC families (server.grpc_metrics), which
        # are worked out from these and the counts above when scraped: so unregistered.
        self._grpc_started = Counter("grpc_started", "calls started, by method", ["method"], registry=None)
        self._grpc_sent = Counter("grpc_sent", "stream messages sent, by method", ["method"], registry=None)
        self._grpc_received = Counter(
            "grpc_received", "stream messages received, by method", ["method"], registry=None
        )
        self._methods: dict[str, MethodCalls] = {}
        self._methods_lock = threading.Lock()
        r.register(
            StandardGrpcMetrics(
                self.rpcs,
                self.rpc_latency,
                self.rejected,
                self._grpc_started,
                self._grpc_sent,
                self._grpc_received,
                lambda: {method: calls.grpc_type for method, calls in list(self._methods.items())},
            )
        )
        # The process (CPU, memory, open file descriptors; Linux), the garbage collector and the
        # interpreter, as the default registry has them; this registry is the process's own.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        Info("orders_build", "the running build: 1, with versions as labels", registry=r).info(
            {"version": version(), "python": platform.python_version(), "grpcio": grpc.__version__}
        )

    def method_calls(self, method: str, kind: str) -> MethodCalls:
        """The counting of one method (`kind`: its gRPC type), made once per method."""
        with self._methods_lock:
            calls = self._methods.get(method)
            if calls is None or calls.grpc_type != kind:
                calls = MethodCalls(
                    method,
                    kind,
                    self.rpcs,
                    self.rpc_latency,
                    self._grpc_started,
                    self._grpc_sent,
                    self._grpc_received,
                )
                self._methods[method] = calls
            return calls

    def watch_pool(self, name: str, checked_out: Callable[[], int]) -> None:
        gauge = Gauge(
            f"orders_db_pool_in_use_{name}",
            f"connections checked out of the {name} pool",
            registry=self.registry,
        )
        gauge.set_function(lambda: float(checked_out()))

    def count_from(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.registry.register(_FunctionCounter(name, documentation, read))

    def watch_breaker(self, breaker: pybreaker.CircuitBreaker) -> None:
        self.breaker_state.set_function(lambda: float(BREAKER_STATES.get(breaker.current_state, 0)))
        metrics = self

        class _Transitions(pybreaker.CircuitBreakerListener):
            def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
                metrics.breaker_transitions.labels(to=new_state.name).inc()

        breaker.add_listener(_Transitions())

    # Observers handed to the saga and dispatcher.
    def on_claimed(self, _event: ClaimedEvent, lag_s: float) -> None:
        self.dispatch_lag.observe(lag_s)

    def on_handled(self, outcome: str, event: ClaimedEvent, seconds: float) -> None:
        self.handled.labels(event_type=event.event_type, outcome=outcome).inc()
        self.handler_latency.labels(event_type=event.event_type).observe(seconds)

    def on_saga_outcome(self, outcome: str) -> None:
        self.saga_outcomes.labels(outcome=outcome).inc()

    def on_backlog(self, pending: int, oldest_age_s: float) -> None:
        self.backlog.set(pending)
        self.oldest_pending.set(oldest_age_s)

    def serve(self, host: str, port: int) -> Callable[[], None]:
        """Start the HTTP endpoint; returns the function that stops it."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(5)

        return stop


class MetricsInterceptor(WrappingInterceptor):
    """Counts every call's start, its end by method and final status code with its latency, and
    the messages of streams (the standard names are worked out from these: server.grpc_metrics).
    A method's handler is wrapped once, its label children bound then (`MethodCalls`)."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        calls = self._metrics.method_calls(method, grpc_type(handler))
        kind = behaviour_name(handler)
        behaviour = getattr(handler, kind)
        wrapped: Callable[..., Any]
        if getattr(behaviour, "experimental_non_blocking", False):
            wrapped = _non_blocking(behaviour, calls, handler.request_streaming)
        elif handler.response_streaming:
            wrapped = _streaming(behaviour, calls, handler.request_streaming)
        else:
            wrapped = _unary(behaviour, calls, handler.request_streaming)
        return handler._replace(**{kind: wrapped})


def _code_name(code: Any, default: str) -> str:
    if code is None:
        return default
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def _counted(requests: Iterator[Any], received: Counter) -> Iterator[Any]:
    for request in requests:
        received.inc()
        yield request


def _unary(behaviour: Callable[..., Any], calls: MethodCalls, counts_requests: bool) -> Callable[..., Any]:
    @functools.wraps(behaviour)
    def unary(request: Any, context: grpc.ServicerContext, *args: Any, **kwargs: Any) -> Any:
        calls.started.inc()
        started = time.perf_counter()
        default = "OK"
        try:
            if counts_requests:
                request = _counted(request, calls.received)
            return behaviour(request, context, *args, **kwargs)
        except BaseException:
            default = "INTERNAL"
            raise
        finally:
            calls.finished(_code_name(context.code(), default), time.perf_counter() - started)

    return unary


def _streaming(
    behaviour: Callable[..., Iterable[Any]], calls: MethodCalls, counts_requests: bool
) -> Callable[..., Iterator[Any]]:
    @functools.wraps(behaviour)
    def streaming(request: Any, context: grpc.ServicerContext, *args: Any, **kwargs: Any) -> Iterator[Any]:
        calls.started.inc()
        started = time.perf_counter()
        default = "OK"
        responses: Iterator[Any] | None = None
        try:
            if counts_requests:
                request = _counted(request, calls.received)
            responses = iter(behaviour(request, context, *args, **kwargs))
            for response in responses:
                calls.sent.inc()
                yield response
        except GeneratorExit:  # the client went away mid-stream
            default = "CANCELLED"
            raise
        except BaseException:
            default = "INTERNAL"
            raise
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()  # the inner interceptors' exits run now, and may still set the code
            calls.finished(_code_name(context.code(), default), time.perf_counter() - started)

    return streaming


def _non_blocking(
    behaviour: Callable[..., None], calls: MethodCalls, counts_requests: bool
) -> Callable[..., None]:
    """A stream whose handler returns at once and sends through a callback: it is counted as
    handled when grpcio ends the call, with the status it ended with."""

    @functools.wraps(behaviour)
    def non_blocking(
        request: Any, context: grpc.ServicerContext, send: Callable[[Any], None], *args: Any, **kwargs: Any
    ) -> None:
        calls.started.inc()
        started = time.perf_counter()
        default = ["OK"]

        def ended() -> None:
            calls.finished(_code_name(context.code(), default[0]), time.perf_counter() - started)

        def counted(message: Any) -> None:
            if message is not None:
                calls.sent.inc()
            send(message)

        if not context.add_callback(ended):  # the call has ended already
            ended()
        try:
            if counts_requests:
                request = _counted(request, calls.received)
            behaviour(request, context, counted, *args, **kwargs)
        except BaseException:
            default[0] = "INTERNAL"
            raise

    return non_blocking
