"""The correlation id of the work in hand, carried by a context variable into every log line.

It lives in the domain layer because every layer (server ingress, outbox headers, saga workers)
reads or restores it, and it depends on nothing but `contextvars`. So does the trace context of the
work in hand when tracing is on (`TraceContext`, set by server.tracing): the logs show its trace id
and the outbox events written under it carry its headers, beside the correlation id.
"""

from __future__ import annotations

import contextvars
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

_CORRELATION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)
_ORDER_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("order_id", default=None)
_TRACE: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar("trace", default=None)

_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def is_valid(value: str | None) -> bool:
    return value is not None and _VALID.fullmatch(value) is not None


def accept_or_new(value: str | None) -> str:
    """The client's id when it is valid (API.md: 1-128 of `[A-Za-z0-9._:-]`), else a new UUID4."""
    return value if value is not None and is_valid(value) else str(uuid.uuid4())


def current() -> str | None:
    return _CORRELATION_ID.get()


def current_order_id() -> str | None:
    return _ORDER_ID.get()


def set_current(correlation_id: str | None) -> None:
    """Set the id for the rest of the current context (a gRPC call, a saga task)."""
    _CORRELATION_ID.set(correlation_id)


def set_order_id(order_id: str | None) -> None:
    _ORDER_ID.set(order_id)


@contextmanager
def bound(correlation_id: str | None, order_id: str | None = None) -> Iterator[None]:
    """Bind ids for the duration of a block and restore the previous ones after it."""
    token = _CORRELATION_ID.set(correlation_id)
    order_token = _ORDER_ID.set(order_id)
    try:
        yield
    finally:
        _ORDER_ID.reset(order_token)
        _CORRELATION_ID.reset(token)


class TraceContext:
    """The span of the work in hand, as the logs (its trace and span ids) and the outbox events
    written under it (its propagation headers: W3C `traceparent`, `tracestate`) carry it. The
    headers are made when first asked for: most calls write no event."""

    __slots__ = ("_headers", "_make_headers", "span_id", "trace_id")

    def __init__(self, trace_id: str, span_id: str, make_headers: Callable[[], Mapping[str, str]]) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self._make_headers = make_headers
        self._headers: Mapping[str, str] | None = None

    @property
    def headers(self) -> Mapping[str, str]:
        if self._headers is None:
            self._headers = dict(self._make_headers())
        return self._headers


def current_trace() -> TraceContext | None:
    """The trace context of the work in hand; None while tracing is off or outside any span."""
    return _TRACE.get()


@contextmanager
def traced(trace: TraceContext | None) -> Iterator[None]:
    """Bind a trace context for the duration of a block and restore the previous one after it."""
    token = _TRACE.set(trace)
    try:
        yield
    finally:
        _TRACE.reset(token)


def event_headers(correlation_id: str | None) -> dict[str, str]:
    """The headers of an outbox event written now: `correlation_id`, and the propagation headers of
    the trace in hand, if any (whoever runs the event continues that trace)."""
    headers = {"correlation_id": correlation_id} if correlation_id else {}
    trace = _TRACE.get()
    if trace is not None:
        headers.update(trace.headers)
    return headers
