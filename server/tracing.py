"""Optional OpenTelemetry tracing: a span per RPC, the trace context through the outbox, and the saga
step as a span of the same trace, in whichever process runs it.

Off by default (`--otel-exporter none`): bootstrap then never imports this module, so the trace
SDK is not loaded and the interceptor chain is the one without tracing. On (`otlp`,
`console`), one `Tracing` per process holds the SDK's tracer provider, configured by the standard
`OTEL_*` variables the SDK reads itself (service name, resource attributes, sampler, OTLP endpoint,
headers, batch sizes, propagators). It does not become the global tracer provider: tests start
several servers in one process.

- RPCs: `TracedCorrelationInterceptor` takes the place of the correlation interceptor. It reads
  the call's metadata once (the correlation id, W3C `traceparent` / `tracestate`, whatever else
  the configured propagators read), starts a SERVER span as the child of the caller's span (or a
  new trace), and answers the trace in the initial metadata beside the correlation id, as W3C
  Trace Context Level 2's `traceresponse` (`00-<trace id>-<span id>-<flags>`). Health is not
  traced (probes every few seconds are not worth a trace each). A non-blocking stream (WatchOrder,
  Health/Watch) keeps its span open until grpcio ends the call. The stock OpenTelemetry gRPC
  interceptor is not used: it wraps every handler on every call and loses grpcio's non-blocking
  handlers (server/nonblocking.py).
- The trace in hand is also bound as `domain.correlation.TraceContext`: the logs show its trace id,
  and an outbox event written under it carries its propagation headers beside the correlation id
  (db.outbox), in the database, so the saga step continues the trace in any process, after any
  restart.
- Saga steps: the dispatcher's handlers are wrapped (`traced_handlers`): each step is a CONSUMER
  span, the child of the span that wrote its event (PlaceOrder's, CancelOrder's). A batch of a
  round's events (saga.verdicts.BatchHandler) is one span linked to every event's trace, and each
  event it answered gets a span of its own in its own trace, over the batch's time, linked back.
  A batch's log lines carry the batch span's trace id.
- Tests (`ORDERS_TESTING_FAULTS=1` only): `--otel-test-span-file PATH` also writes every finished
  span, as it ends, as one JSON object a line (the SDK's `ReadableSpan.to_json`) to PATH, for a
  test to read what a server process traced.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import get_global_textmap
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from db.outbox import ClaimedEvent
from domain import correlation
from domain.deadline import deadline_bound
from saga.verdicts import BatchHandler, Completed, Defer, Done, Handler, Retry, Verdict
from server import reply_metadata
from server.config import Settings, version
from server.interceptors import (
    CORRELATION_HEADER,
    CorrelationInterceptor,
    behaviour_name,
    call_deadline,
    wrap_handler,
)

TRACE_RESPONSE_HEADER = "traceresponse"
# Not traced: health probes, every few seconds from every prober.
UNTRACED_PREFIXES = ("/grpc.health.v1.Health/",)
# Server span status per OpenTelemetry's gRPC conventions: these codes are the server's errors;
# the others (INVALID_ARGUMENT, NOT_FOUND, ...) are the caller's and leave the status unset.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _one_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + "\n"


class Tracing:
    """One process's tracing: the tracer provider and the wrappers that trace with it."""

    def __init__(self, provider: TracerProvider, propagator: TextMapPropagator | None = None) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("orders-service", version())
        self._propagator = propagator or get_global_textmap()
        self._fields = frozenset(self._propagator.fields)
        self._files: list[IO[str]] = []

    @classmethod
    def start(cls, settings: Settings) -> Tracing:
        """The provider with the exporters `settings` ask for (their details from `OTEL_*`)."""
        # The process exits through Service.stop, which flushes; the SDK's own exit hook would
        # wait on an unreachable collector.
        provider = TracerProvider(resource=_resource(), shutdown_on_exit=False)
        exporter: SpanExporter | None = None
        if settings.otel_exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        elif settings.otel_exporter == "console":
            exporter = ConsoleSpanExporter(formatter=_one_line)  # stdout; the log is on stderr
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        tracing = cls(provider)
        if settings.otel_test_span_file:
            out = open(settings.otel_test_span_file, "a", encoding="utf-8")  # noqa: SIM115 - closed at shutdown
            tracing._files.append(out)
            provider.add_span_processor(
                SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=_one_line))
            )
        return tracing

    @classmethod
    def for_benchmark(cls) -> Tracing:
        """Spans made and sampled, exported nowhere (bench/interceptor_cost.py)."""
        return cls(TracerProvider(resource=_resource(), shutdown_on_exit=False))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Export what is still queued, for at most `timeout_s` (a collector that does not answer
        must not hold the process's exit)."""
        stopper = threading.Thread(target=self._provider.shutdown, name="otel-shutdown", daemon=True)
        stopper.start()
        stopper.join(timeout_s)
        if not stopper.is_alive():  # else an export may still write to them
            for out in self._files:
                out.close()

    def correlation_interceptor(self, first_message_at_once: Collection[str] = ()) -> CorrelationInterceptor:
        return TracedCorrelationInterceptor(self, first_message_at_once)

    # RPCs

    @contextmanager
    def rpc(
        self,
        method: str,
        attributes: Mapping[str, str],
        context: grpc.ServicerContext,
        end: bool = True,
        with_reply: bool = False,
    ) -> Iterator[Span]:
        """The call's correlation id and SERVER span, bound for the block, both answered in the
        initial metadata (`with_reply`: sent with the call's first message, server.reply_metadata);
        the span ends with the block, with the call's status (unless not to `end` it: the caller
        ends it later with `_end_rpc`)."""
        carrier: dict[str, str] = {}
        correlation_id = None
        for item in context.invocation_metadata() or ():
            if item.key == CORRELATION_HEADER:
                correlation_id = item.value
            elif item.key in self._fields:
                carrier[item.key] = item.value
        parent = self._propagator.extract(carrier) if carrier else otel_context.Context()
        correlation_id = correlation.accept_or_new(correlation_id)
        correlation.set_current(correlation_id)
        span = self._tracer.start_span(
            method[1:], parent, SpanKind.SERVER, {**attributes, "orders.correlation_id": correlation_id}
        )
        span_context = span.get_span_context()
        bound = trace.set_span_in_context(span, parent)
        token = otel_context.attach(bound)
        trace_id, span_id = f"{span_context.trace_id:032x}", f"{span_context.span_id:016x}"
        answer = f"00-{trace_id}-{span_id}-{span_context.trace_flags:02x}"
        headers = ((CORRELATION_HEADER, correlation_id), (TRACE_RESPONSE_HEADER, answer))
        reply_metadata.send(context, headers, with_reply)
        deadline = call_deadline(context)
        code: grpc.StatusCode | None = None
        try:
            trace_context = correlation.TraceContext(trace_id, span_id, self._headers(bound))
            with correlation.traced(trace_context), deadline_bound(deadline):
                yield span
        except GeneratorExit:  # the client went away mid-stream
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            otel_context.detach(token)
            if end:
                _end_rpc(span, context.code() or code or grpc.StatusCode.OK, correlation.current_order_id())

    def _headers(self, bound: otel_context.Context) -> Callable[[], Mapping[str, str]]:
        def make() -> Mapping[str, str]:
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier, bound)
            return carrier

        return make

    # Saga steps

    def traced_handlers(self, handlers: Mapping[str, Handler]) -> dict[str, Handler]:
        """Each handler's step as a CONSUMER span, the child of the span that wrote its event."""
        return {
            event_type: functools.partial(self._step, handler) for event_type, handler in handlers.items()
        }

    def traced_batch_handlers(self, handlers: Mapping[str, BatchHandler]) -> dict[str, BatchHandler]:
        """Each batch as a span linked to its events' traces, and a span in each event's trace."""
        return {
            event_type: functools.partial(self._batch, event_type, handler)
            for event_type, handler in handlers.items()
        }

    def _step(self, handler: Handler, event: ClaimedEvent) -> Verdict:
        parent = self._propagator.extract(event.headers)
        span = self._tracer.start_span(
            f"saga {event.event_type}", parent, SpanKind.CONSUMER, _event_attributes(event)
        )
        with trace.use_span(span, end_on_exit=True), correlation.traced(self._trace_context(span)):
            verdict = handler(event)
            _describe(span, verdict)
            return verdict

    def _batch(
        self, event_type: str, handler: BatchHandler, events: Sequence[ClaimedEvent]
    ) -> Mapping[int, Verdict]:
        parents = {event.id: self._propagator.extract(event.headers) for event in events}
        links = [
            Link(context, {"orders.event.id": event.id})
            for event in events
            if (context := trace.get_current_span(parents[event.id]).get_span_context()).is_valid
        ]
        started = time.time_ns()
        batch = self._tracer.start_span(
            f"saga {event_type} batch",
            otel_context.Context(),
            SpanKind.CONSUMER,
            {"orders.event.type": event_type, "orders.batch.size": len(events)},
            links,
        )
        with trace.use_span(batch, end_on_exit=True), correlation.traced(self._trace_context(batch)):
            verdicts = handler(events)
        ended = time.time_ns()
        back = [Link(batch.get_span_context())]
        for event in events:
            verdict = verdicts.get(event.id)
            if verdict is None:  # the dispatcher runs it alone next: a span of its own then
                continue
            attributes = {**_event_attributes(event), "orders.batch.size": len(events)}
            step = self._tracer.start_span(
                f"saga {event_type}",
                parents[event.id],
                SpanKind.CONSUMER,
                attributes,
                back,
                start_time=started,
            )
            _describe(step, verdict)
            step.end(end_time=ended)
        return verdicts

    def _trace_context(self, span: Span) -> correlation.TraceContext:
        span_context = span.get_span_context()
        bound = trace.set_span_in_context(span)
        return correlation.TraceContext(
            f"{span_context.trace_id:032x}", f"{span_context.span_id:016x}", self._headers(bound)
        )


class TracedCorrelationInterceptor(CorrelationInterceptor):
    """The correlation interceptor with a SERVER span per call (see the module docstring)."""

    def __init__(self, tracing: Tracing, first_message_at_once: Collection[str] = ()) -> None:
        super().__init__(first_message_at_once)
        self._tracing = tracing

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method.startswith(UNTRACED_PREFIXES):
            return super()._wrap(method, handler)
        service, _, name = method[1:].rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        with_reply = self.sends_with_first_message(method, handler)
        behaviour = handler.unary_stream or handler.stream_stream
        if behaviour is not None and getattr(behaviour, "experimental_non_blocking", False):
            return _non_blocking(self._tracing, handler, method, attributes, with_reply)

        def around(method: str, context: grpc.ServicerContext) -> Any:
            return self._tracing.rpc(method, attributes, context, with_reply=with_reply)

        return wrap_handler(handler, method, around)


def _non_blocking(
    tracing: Tracing,
    handler: grpc.RpcMethodHandler,
    method: str,
    attributes: Mapping[str, str],
    with_reply: bool,
) -> grpc.RpcMethodHandler:
    """A stream whose handler returns at once: its span ends when grpcio ends the call."""
    kind = behaviour_name(handler)
    behaviour = getattr(handler, kind)

    @functools.wraps(behaviour)
    def stream(request: Any, context: grpc.ServicerContext, *args: Any, **kwargs: Any) -> None:
        with tracing.rpc(method, attributes, context, end=False, with_reply=with_reply) as span:

            def ended() -> None:
                _end_rpc(span, context.code() or grpc.StatusCode.OK, None)

            if not context.add_callback(ended):
                ended()  # the call has ended already
            behaviour(request, context, *args, **kwargs)

    return handler._replace(**{kind: stream})


def _end_rpc(span: Span, code: grpc.StatusCode, order_id: str | None) -> None:
    if order_id is None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
    else:
        span.set_attributes({"rpc.grpc.status_code": code.value[0], "orders.order_id": order_id})
    if code in SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


def _event_attributes(event: ClaimedEvent) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "orders.event.id": event.id,
        "orders.event.type": event.event_type,
        "orders.event.attempt": event.attempts,
        "orders.order_id": event.aggregate_id,
    }
    if event.correlation_id:
        attributes["orders.correlation_id"] = event.correlation_id
    return attributes


def _describe(span: Span, verdict: Verdict) -> None:
    if isinstance(verdict, Done | Completed):
        span.set_attribute("orders.saga.verdict", "done" if getattr(verdict, "kept", True) else "fenced")
    elif isinstance(verdict, Defer):
        span.set_attribute("orders.saga.verdict", "deferred")
        span.set_attribute("orders.saga.reason", verdict.reason)
    elif isinstance(verdict, Retry):
        span.set_attribute("orders.saga.verdict", "retry")
        span.set_status(Status(StatusCode.ERROR, verdict.error))


def _resource() -> Resource:
    """The SDK's resource from `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`, named
    `orders-service` when they name no service, with this build's version."""
    resource = Resource.create({SERVICE_VERSION: version()})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "orders-service"}))
    return resource
