"""The gRPC server metrics that dashboards know (go-grpc-prometheus' `grpc_server_*` names), made
from what the service counts anyway.

Per call, the metrics interceptor (server.metrics) counts a start, then the call's end in
`orders_rpc_total{method,code}` and `orders_rpc_duration_seconds{method,code}`, through label
children bound once per method and code (`MethodCalls`): no `labels()` lookup on a call. Streams
also count their messages. The `grpc_server_*` families are worked out from those when scraped
(`StandardGrpcMetrics`): handled calls and the handling-time histogram are the service's own,
summed over codes; a unary call's one message in is its start and its one message out is an OK
end. So the standard names cost a call one counter increment (the start), not five more samples.

Calls refused at admission (RESOURCE_EXHAUSTED before any interceptor ran,
`orders_rpc_rejected_total`) are counted as started and handled with `ResourceExhausted`, as a
Go server counts a call its limiter refuses; they take no handling time.

`grpc_code` is spelled as Go spells it (`InvalidArgument`, `Canceled`): the dashboards and alerts
written for go-grpc-prometheus match those strings. The service's own `code` label keeps Python's
names (`INVALID_ARGUMENT`).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

UNARY, CLIENT_STREAM, SERVER_STREAM, BIDI_STREAM = "unary", "client_stream", "server_stream", "bidi_stream"

GO_CODE_NAMES = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}


def grpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return BIDI_STREAM if handler.response_streaming else CLIENT_STREAM
    return SERVER_STREAM if handler.response_streaming else UNARY


def split_method(method: str) -> tuple[str, str]:
    """`/pkg.Service/Method` -> (`pkg.Service`, `Method`)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class MethodCalls:
    """One method's counting, its label children bound once: `labels()` builds a key and takes a
    lock on every call, a cost the interceptor would pay twice per call (docs/performance.md)."""

    __slots__ = (
        "_by_code",
        "_latency",
        "_lock",
        "_rpcs",
        "grpc_type",
        "method",
        "received",
        "sent",
        "started",
    )

    def __init__(
        self,
        method: str,
        kind: str,
        rpcs: Counter,
        latency: Histogram,
        started: Counter,
        sent: Counter,
        received: Counter,
    ) -> None:
        self.method = method
        self.grpc_type = kind
        self.started = started.labels(method)
        self.sent = sent.labels(method)
        self.received = received.labels(method)
        self._rpcs = rpcs
        self._latency = latency
        self._lock = threading.Lock()
        self._by_code: dict[str, tuple[Counter, Histogram]] = {}

    def finished(self, code: str, seconds: float) -> None:
        """A call ended with the status named `code` (Python's name) after `seconds`."""
        children = self._by_code.get(code)
        if children is None:
            children = self._bind(code)
        children[0].inc()
        children[1].observe(seconds)

    def _bind(self, code: str) -> tuple[Counter, Histogram]:
        with self._lock:
            children = self._by_code.get(code)
            if children is None:
                children = (
                    self._rpcs.labels(method=self.method, code=code),
                    self._latency.labels(method=self.method, code=code),
                )
                self._by_code[code] = children
            return children


@dataclass
class _Method:
    started: float = 0.0
    refused: float = 0.0
    sent: float = 0.0
    received: float = 0.0
    handled: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    buckets: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    seconds: float = 0.0


class StandardGrpcMetrics(Collector):
    """The `grpc_server_*` families, worked out from the service's own counts when scraped."""

    def __init__(
        self,
        rpcs: Counter,
        latency: Histogram,
        rejected: Counter,
        started: Counter,
        sent: Counter,
        received: Counter,
        types: Callable[[], dict[str, str]],
    ) -> None:
        self._rpcs, self._latency, self._rejected = rpcs, latency, rejected
        self._started, self._sent, self._received = started, sent, received
        self._types = types

    def collect(self) -> Iterator[Metric]:
        types = self._types()
        methods: dict[str, _Method] = defaultdict(_Method)
        for sample_labels, value in _samples(self._started):
            methods[sample_labels["method"]].started += value
        for sample_labels, value in _samples(self._sent):
            methods[sample_labels["method"]].sent += value
        for sample_labels, value in _samples(self._received):
            methods[sample_labels["method"]].received += value
        for sample_labels, value in _samples(self._rejected):
            methods[sample_labels["method"]].refused += value
        for sample_labels, value in _samples(self._rpcs):
            methods[sample_labels["method"]].handled[sample_labels["code"]] += value
        for metric in self._latency.collect():
            for sample in metric.samples:
                one = methods[sample.labels["method"]]
                if sample.name.endswith("_bucket"):
                    one.buckets[sample.labels["le"]] += sample.value
                elif sample.name.endswith("_sum"):
                    one.seconds += sample.value

        names = ["grpc_type", "grpc_service", "grpc_method"]
        started = CounterMetricFamily(
            "grpc_server_started_total", "Total number of RPCs started on the server.", labels=names
        )
        handled = CounterMetricFamily(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            labels=[*names, "grpc_code"],
        )
        received = CounterMetricFamily(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            labels=names,
        )
        sent = CounterMetricFamily(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            labels=names,
        )
        handling = HistogramMetricFamily(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled "
            "by the server.",
            labels=names,
        )
        for method, one in sorted(methods.items()):
            kind = types.get(method)
            if kind is None:  # refused before its handler was ever wrapped: nothing more is known
                kind = UNARY
            labels = [kind, *split_method(method)]
            started.add_metric(labels, one.started + one.refused)
            codes = dict(one.handled)
            if one.refused:
                codes["RESOURCE_EXHAUSTED"] = codes.get("RESOURCE_EXHAUSTED", 0.0) + one.refused
            for code, value in sorted(codes.items()):
                handled.add_metric([*labels, GO_CODE_NAMES.get(code, code)], value)
            client_streams = kind in (CLIENT_STREAM, BIDI_STREAM)
            server_streams = kind in (SERVER_STREAM, BIDI_STREAM)
            received.add_metric(labels, one.received if client_streams else one.started)
            sent.add_metric(labels, one.sent if server_streams else one.handled.get("OK", 0.0))
            if one.buckets:
                ordered = sorted(one.buckets.items(), key=lambda item: float(item[0]))
                handling.add_metric(labels, ordered, one.seconds)
        yield from (started, handled, received, sent, handling)


def _samples(counter: Counter) -> Iterable[tuple[dict[str, str], float]]:
    """A labelled counter's totals (not its `_created` samples)."""
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                yield sample.labels, sample.value
