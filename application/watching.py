"""WatchOrder without a thread per stream: the current order at once, then each change, until the
order settles, the call ends, or the stream reaches its lifetime.

An open stream is a registration, not a waiting thread: a commit (or, on PostgreSQL, a
notification from another process) reaches `OrderChanges`, whose listener queues a check of the
order on the watcher's few threads; a check reads the order and sends it when its version moved.
The first state and a check take the order from `OrderChanges.recent` instead when this process
has just committed a newer version of it: a flow (PlaceOrder, WatchOrder, the saga's settle) in one
process reads no order.
A timer queues a check of every stream once per `safety_poll_s` (the first one at a random point
within it, so that streams opened together do not poll together), the safety net for a missed
signal, and ends a stream at its lifetime with UNAVAILABLE, which tells the client to watch again.
One check of a stream runs at a time, so its messages keep their order.
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from domain.deadline import deadline_bound
from domain.errors import DomainError, UnavailableError
from domain.model import Order
from saga.signals import OrderChanges

log = logging.getLogger(__name__)

SHUTTING_DOWN = "server shutting down: watch again on another instance"


class WatchCall(Protocol):
    """One WatchOrder call as the watcher sees it (server.servicers adapts grpcio's)."""

    def send(self, order: Order) -> bool:
        """Send one state of the order; False once the call has ended."""
        ...

    def end(self, error: Exception | None) -> None:
        """End the call: OK when `error` is None, else the error's status."""
        ...

    def on_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the call has ended, whatever ended it (at once if it has)."""
        ...


def _nothing() -> None:
    pass


@dataclass(eq=False)
class _Watch:
    order_id: str
    call: WatchCall
    expires_at: float
    context: contextvars.Context  # the call's: its correlation id goes into the checks' log lines
    version: int = 0
    busy: bool = True  # a check is queued or running; the first "check" is `open` itself
    again: bool = False  # something happened while it ran: check once more
    ended: bool = False
    unsubscribe: Callable[[], None] = field(default=_nothing)


class OrderWatcher:
    """Follows orders for WatchOrder calls on `threads` threads, whatever the number of calls."""

    def __init__(
        self,
        load: Callable[[str], Order],
        changes: OrderChanges,
        *,
        max_lifetime_s: float,
        safety_poll_s: float = 1.0,
        threads: int = 4,
        load_timeout_s: float = 5.0,
    ) -> None:
        self._load = load
        self._changes = changes
        self._max_lifetime_s = max_lifetime_s
        self._safety_poll_s = safety_poll_s
        self._load_timeout_s = load_timeout_s
        self._threads = threads
        self._lock = threading.Lock()
        self._timer_wake = threading.Condition(self._lock)
        self._watches: set[_Watch] = set()
        self._due: list[tuple[float, int, _Watch]] = []  # the timer's heap: next check of each stream
        self._sequence = itertools.count()
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._timer: threading.Thread | None = None

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._watches)

    def open(self, order_id: str, call: WatchCall) -> None:
        """Start following `order_id` for `call`. Runs in the call's handler thread: it reads and
        sends the order (a NotFoundError and the like reach the caller), then returns; what
        follows runs on the watcher's threads."""
        watch = _Watch(order_id, call, time.monotonic() + self._max_lifetime_s, contextvars.copy_context())
        # Listening from before the first read: a change between the read and the registration
        # below is not lost (it sets `again`).
        watch.unsubscribe = self._changes.subscribe(order_id, partial(self._changed, watch))
        try:
            order = self._changes.recent(order_id) or self._load(order_id)
        except BaseException:
            watch.unsubscribe()
            raise
        watch.version = order.version
        if not call.send(order):
            watch.unsubscribe()
            return
        if order.status.is_settled:
            watch.unsubscribe()
            call.end(None)
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._start_threads()
                self._watches.add(watch)
                self._plan(watch, time.monotonic() + random.uniform(0, self._safety_poll_s))
        if closed:
            watch.unsubscribe()
            call.end(UnavailableError(SHUTTING_DOWN))
            return
        call.on_done(partial(self._forget, watch))
        if self._after_check(watch):
            self._submit(watch)

    def close(self) -> None:
        """End every stream with UNAVAILABLE (the server is stopping) and let the threads go."""
        with self._lock:
            self._closed = True
            watches = list(self._watches)
            self._timer_wake.notify_all()
            pool = self._pool
        for watch in watches:
            self._changed(watch)
        if pool is not None:
            pool.shutdown(wait=False)  # the checks just queued still run, and end their streams

    def _start_threads(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="watch")
            self._timer = threading.Thread(target=self._run_timer, name="watch-timer", daemon=True)
            self._timer.start()

    def _plan(self, watch: _Watch, at: float) -> None:
        """Under the lock: the timer checks `watch` at `at`, or at its lifetime if sooner."""
        due = min(at, watch.expires_at)
        if not self._due or due < self._due[0][0]:
            self._timer_wake.notify()
        heapq.heappush(self._due, (due, next(self._sequence), watch))

    def _run_timer(self) -> None:
        while True:
            claimed = []
            with self._lock:
                while not self._closed:
                    now = time.monotonic()
                    if self._due and self._due[0][0] <= now:
                        due, _, watch = heapq.heappop(self._due)
                        if watch.ended:
                            continue
                        if due < watch.expires_at:
                            self._plan(watch, now + self._safety_poll_s)
                        if self._claim(watch):
                            claimed.append(watch)
                    elif claimed:
                        break
                    else:
                        self._timer_wake.wait(self._due[0][0] - now if self._due else None)
                if self._closed:
                    return
            for watch in claimed:
                self._submit(watch)

    def _claim(self, watch: _Watch) -> bool:
        """Under the lock: True when the caller is to queue a check of `watch`."""
        if watch.ended:
            return False
        if watch.busy:
            watch.again = True
            return False
        watch.busy = True
        return True

    def _changed(self, watch: _Watch) -> None:
        """The order changed, or the server is stopping (a publisher's thread: must not wait)."""
        with self._lock:
            claimed = self._claim(watch)
        if claimed:
            self._submit(watch)

    def _submit(self, watch: _Watch) -> None:
        pool = self._pool
        try:
            if pool is None:
                raise RuntimeError("no watch threads")
            pool.submit(watch.context.copy().run, self._check, watch)
        except RuntimeError:  # shut down: the server is stopping
            self._end(watch, UnavailableError(SHUTTING_DOWN))

    def _check(self, watch: _Watch) -> None:
        while not watch.ended:
            error: Exception | None = None
            settled = False
            if self._closed or self._changes.closed:
                # Ending with OK here would read as "settled" to a client holding a PENDING order.
                error = UnavailableError(SHUTTING_DOWN)
            elif time.monotonic() >= watch.expires_at:
                error = UnavailableError(f"watch lifetime of {self._max_lifetime_s:g} s reached: watch again")
            else:
                try:
                    latest = self._changes.recent(watch.order_id)
                    if latest is None or latest.version <= watch.version:  # nothing new here: read
                        with deadline_bound(time.monotonic() + self._load_timeout_s):
                            latest = self._load(watch.order_id)
                except Exception as failure:
                    if not isinstance(failure, DomainError):
                        log.error("WatchOrder of %s failed", watch.order_id, exc_info=failure)
                    error = failure
                else:
                    if latest.version != watch.version:
                        watch.version = latest.version
                        if not watch.call.send(latest):
                            self._forget(watch)
                            return
                    settled = latest.status.is_settled
            if error is not None or settled:
                self._end(watch, error)
                return
            if not self._after_check(watch):
                return

    def _after_check(self, watch: _Watch) -> bool:
        """A check is over: True when something happened meanwhile, and the stream (still busy)
        is to be checked again."""
        with self._lock:
            if watch.again and not watch.ended:
                watch.again = False
                return True
            watch.busy = False
            return False

    def _end(self, watch: _Watch, error: Exception | None) -> None:
        with self._lock:
            if watch.ended:
                return
            watch.ended = True
            self._watches.discard(watch)
        watch.unsubscribe()
        watch.call.end(error)

    def _forget(self, watch: _Watch) -> None:
        """The call ended on its own (the client went away, its deadline passed): drop it. Runs on
        grpcio's serving thread, so it only takes locks."""
        with self._lock:
            watch.ended = True
            self._watches.discard(watch)
        watch.unsubscribe()
