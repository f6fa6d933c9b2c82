"""Admission: which calls may take a handler thread, and how many streams of each kind may be open.

grpcio's own limit (`maximum_concurrent_rpcs`) counts a call until its handler returns, so an open
stream counts for its whole life: a few hundred idle streams (server reflection, Health/Watch,
WatchOrder) would leave every unary call RESOURCE_EXHAUSTED, or, under the limit, take every
handler thread. Here instead:

- unary calls run on the handler threads (`HandlerThreads`), which count the calls queued or
  running there; past `limit` a new call is refused at once with RESOURCE_EXHAUSTED, the refusal
  answered on a thread of its own so that it does not queue behind the calls it protects;
- streams never touch the handler threads. They start on a few threads of their own (the start
  reads the first state: WatchOrder's first read of its order), and then hold no thread at all:
  Health/Watch and WatchOrder are non-blocking (grpcio's `experimental_non_blocking`: the handler
  gets a send callback and returns), and a blocking stream (server reflection, which waits for its
  requests) runs on a pool of its kind's own;
- each kind of stream has a cap on the streams open at once; past it, RESOURCE_EXHAUSTED.

Refusals are counted (`orders_rpc_rejected_total{method,reason}`) and logged at most once per
`RefusalLog.interval_s`, with the count.

Why one module of this size: unary admission and stream caps share the counting, the refusal
answer and its metric and log line.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import grpc
from prometheus_client import Counter

from server.interceptors import Continuation, KeptHandlers, behaviour_name
from server.metrics import Metrics

log = logging.getLogger("orders.admission")

P = ParamSpec("P")
T = TypeVar("T")

HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
WATCH_ORDER = "/orders.v1.OrderService/WatchOrder"


class HandlerThreads(ThreadPoolExecutor):
    """The gRPC server's handler threads, counting the calls queued or running on them."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "grpc") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._count_lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._count_lock:
            self._in_flight += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future: Future[Any] | None) -> None:
        with self._count_lock:
            self._in_flight -= 1


@dataclass(frozen=True)
class StreamKind:
    """A kind of stream: its method, its name in metrics and logs, and how many may be open."""

    name: str
    method: str
    cap: int
    # A blocking handler (one that waits for requests) runs on a pool of `cap` threads of its own.
    own_threads: bool = False


class RefusalLog:
    """Counts each refusal in the metric, and logs them at most once per `interval_s` with the
    count: the first at once, the rest of a burst at the end of its interval."""

    def __init__(
        self, counter: Counter, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self._counter = counter
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: collections.Counter[str] = collections.Counter()
        self._last_line = -float("inf")
        self._timer: threading.Timer | None = None
        self._closed = False

    def refused(self, method: str, reason: str) -> None:
        self._counter.labels(method=method, reason=reason).inc()
        with self._lock:
            self._pending[reason] += 1
            now = self._clock()
            if now - self._last_line >= self.interval_s:
                line = self._take(now)
            else:
                line = None
                if self._timer is None and not self._closed:
                    self._timer = threading.Timer(self._last_line + self.interval_s - now, self.flush)
                    self._timer.daemon = True
                    self._timer.start()
        if line:
            log.warning("%s", line)

    def flush(self) -> None:
        with self._lock:
            self._timer = None
            line = self._take(self._clock()) if self._pending else None
        if line:
            log.warning("%s", line)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self.flush()

    def _take(self, now: float) -> str:
        since = now - self._last_line
        total = sum(self._pending.values())
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self._pending.items()))
        when = f" in the last {since:.1f} s" if since != float("inf") else ""
        self._pending.clear()
        self._last_line = now
        return (
            f"refused {total} call{'s' if total != 1 else ''} at admission{when} with "
            f"RESOURCE_EXHAUSTED ({reasons}); next report in {self.interval_s:g} s at the earliest "
            "(orders_rpc_rejected_total counts every one)"
        )


class _Slots:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.open >= self.cap:
                return False
            self.open += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.open -= 1


class Admission(grpc.ServerInterceptor):  # type: ignore[misc]
    """The first interceptor of the server (outermost): decides on every call, on grpcio's polling
    thread, from a count it only reads. Handlers it makes are kept per method, as
    server.interceptors does, and keep the attributes of the handlers they wrap."""

    def __init__(
        self,
        threads: HandlerThreads,
        limit: int,
        kinds: Iterable[StreamKind],
        metrics: Metrics,
        stream_start_threads: int = 4,
        log_interval_s: float = 10.0,
    ) -> None:
        self._threads = threads
        self._limit = limit
        self.refusals = RefusalLog(metrics.rejected, log_interval_s)
        self._kinds = {kind.method: kind for kind in kinds}
        self._stream_starts = HandlerThreads(stream_start_threads, thread_name_prefix="grpc-stream")
        # More starts waiting than streams could ever be open: those are refused whatever happens.
        self._stream_start_limit = sum(kind.cap for kind in self._kinds.values())
        self._slots = {kind.method: _Slots(kind.cap) for kind in self._kinds.values()}
        self._pools = {
            kind.method: ThreadPoolExecutor(kind.cap, thread_name_prefix=f"stream-{kind.name}")
            for kind in self._kinds.values()
            if kind.own_threads
        }
        # Refusals run here, not behind the calls on the handler threads they are refused to protect.
        self._refusal_threads = ThreadPoolExecutor(2, thread_name_prefix="grpc-refuse")
        self._streams = KeptHandlers()
        self._refusing = KeptHandlers()
        for kind in self._kinds.values():
            metrics.open_streams.labels(kind=kind.name).set_function(
                functools.partial(self.open_streams, kind.name)
            )

    @property
    def calls_in_flight(self) -> int:
        """Unary calls queued or running on the handler threads now."""
        return self._threads.in_flight

    def open_streams(self, kind_name: str) -> int:
        """Streams of the kind named `kind_name` open now."""
        return sum(s.open for m, s in self._slots.items() if self._kinds[m].name == kind_name)

    def close(self) -> None:
        """After the server stopped: let the stream and refusal threads go."""
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._stream_starts.shutdown(wait=False)
        self._refusal_threads.shutdown(wait=False)
        self.refusals.close()

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED, from grpcio
        method = handler_call_details.method
        if method in self._kinds:
            if self._stream_starts.in_flight >= self._stream_start_limit:
                return self._refusing.get(method, handler, self._refusing_handler)
            return self._streams.get(method, handler, self._stream_handler)
        if self._threads.in_flight >= self._limit:
            return self._refusing.get(method, handler, self._refusing_handler)
        return handler

    def _refusing_handler(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method in self._kinds:
            reason = "stream_limit"
            message = f"server busy: {self._stream_start_limit} streams already starting; retry later"
        else:
            reason = "concurrency"
            message = f"server busy: {self._limit} calls already running or queued; retry with backoff"

        def refuse(request: Any, context: grpc.ServicerContext, *_send: Any) -> None:
            self.refusals.refused(method, reason)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

        refuse.experimental_thread_pool = self._refusal_threads  # type: ignore[attr-defined]
        # A streaming method's refusal sends no message: grpcio need not hold a thread for it.
        refuse.experimental_non_blocking = handler.response_streaming  # type: ignore[attr-defined]
        return handler._replace(**{behaviour_name(handler): refuse})

    def _stream_handler(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kind = self._kinds[method]
        slots = self._slots[method]
        name = behaviour_name(handler)
        behaviour = getattr(handler, name)

        def refuse(context: grpc.ServicerContext) -> None:
            self.refusals.refused(method, "stream_limit")
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{slots.cap} {kind.name} streams already open, the most this server keeps: retry later",
            )

        if getattr(behaviour, "experimental_non_blocking", False):

            @functools.wraps(behaviour)
            def capped(request: Any, context: grpc.ServicerContext, send: Callable[[Any], None]) -> None:
                if not slots.take():
                    refuse(context)
                if not context.add_callback(slots.give_back):  # the call has ended already
                    slots.give_back()
                    return
                behaviour(request, context, send)

            capped.experimental_non_blocking = True  # type: ignore[attr-defined]
            capped.experimental_thread_pool = self._stream_starts  # type: ignore[attr-defined]
            return handler._replace(**{name: capped})

        if not kind.own_threads:
            raise ValueError(f"{method}: a blocking stream needs threads of its own (own_threads)")
        pool = self._pools[method]

        @functools.wraps(behaviour)
        def detached(request: Any, context: grpc.ServicerContext, send: Callable[[Any], None]) -> None:
            if not slots.take():
                refuse(context)
            try:
                # A new copy of the call's context: the pool thread runs the stream in it.
                pool.submit(
                    contextvars.copy_context().run,
                    _run_stream,
                    kind.name,
                    behaviour,
                    request,
                    context,
                    send,
                    slots,
                )
            except RuntimeError:  # the pool is shut down: the server is stopping
                slots.give_back()
                context.abort(grpc.StatusCode.UNAVAILABLE, "server shutting down")

        detached.experimental_non_blocking = True  # type: ignore[attr-defined]
        detached.experimental_thread_pool = self._stream_starts  # type: ignore[attr-defined]
        return handler._replace(**{name: detached})


def _run_stream(
    kind: str,
    behaviour: Callable[..., Iterable[Any]],
    request: Any,
    context: grpc.ServicerContext,
    send: Callable[[Any], None],
    slots: _Slots,
) -> None:
    """What grpcio does with a blocking stream handler on a handler thread, on the kind's own."""
    responses: Iterator[Any] | None = None
    try:
        responses = iter(behaviour(request, context))
        for response in responses:
            send(response)
            if not context.is_active():
                return
        send(None)
    except Exception as error:
        if context.is_active():
            if context.code() is None:  # not an abort: the handler failed
                log.error("%s stream failed", kind, exc_info=error)
                context.set_code(grpc.StatusCode.UNKNOWN)
                context.set_details(f"Exception iterating responses: {error}")
            send(None)
    finally:
        # Closing the generator runs the interceptors' exits (a client gone mid-stream counts as
        # CANCELLED) in this thread, now, rather than whenever it is collected.
        close = getattr(responses, "close", None)
        if close is not None:
            close()
        slots.give_back()


def stream_kinds(max_health_watch: int, max_reflection: int, max_watch_order: int) -> Sequence[StreamKind]:
    """This server's streams: Health/Watch and WatchOrder hold no thread, reflection holds one of
    its own pool while open."""
    return (
        StreamKind("health_watch", HEALTH_WATCH, max_health_watch),
        StreamKind("reflection", REFLECTION, max_reflection, own_threads=True),
        StreamKind("watch_order", WATCH_ORDER, max_watch_order),
    )
