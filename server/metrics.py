"""Prometheus metrics on a port of their own (`--metrics-port`), one registry per Service."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pybreaker
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from db.outbox import ClaimedEvent
from server.interceptors import WrappingInterceptor

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BREAKER_STATES = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}


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
        self.breaker_state.set_function(lambda: float(_BREAKER_STATES.get(breaker.current_state, 0)))
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
    """Counts every call and its latency by method and final status code."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    @contextmanager
    def around(self, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        started = time.perf_counter()
        default = grpc.StatusCode.OK
        try:
            yield
        except GeneratorExit:  # the client went away mid-stream
            default = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            default = grpc.StatusCode.INTERNAL
            raise
        finally:
            code = context.code() or default
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            self._metrics.rpcs.labels(method=method, code=name).inc()
            self._metrics.rpc_latency.labels(method=method, code=name).observe(time.perf_counter() - started)
