"""Guards of the call to the inventory participant: a circuit breaker and a rate limiter.

`ConcurrentCircuitBreaker` keeps pybreaker's state machine, listeners and storage (memory or
Redis), but changes two things pybreaker gets wrong for a thread pool:

- pybreaker holds one lock for the whole protected call, so every saga step through one breaker
  would run one at a time. Here the lock covers only reading and changing the state; calls run in
  parallel, and in the half-open state exactly one probe is let through.
- pybreaker counts only exceptions. Here a call slower than `slow_call_s` is recorded as a failure
  too (its result is still used). A hung call is never recorded, so the protected calls must carry
  their own deadline (the inventory transaction has a statement timeout).

Business outcomes (insufficient stock) are return values, not exceptions, so they never count.
Every state change of the breaker is logged: opening as a warning, with the failure that tripped it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pybreaker
from limits import parse as parse_rate
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

T = TypeVar("T")

log = logging.getLogger(__name__)


class SlowCallError(Exception):
    """Stands for a call that succeeded too slowly, when it is recorded as a failure."""


class RateLimitedError(Exception):
    pass


BreakerOpenError = pybreaker.CircuitBreakerError


class _LogTransitions(pybreaker.CircuitBreakerListener):
    """Every state change in the log: opening as a warning with the failure that tripped it, the
    probe and the closing as information. (A change made by another process, through shared
    storage, is logged by each process that notices it.)"""

    def __init__(self) -> None:
        self._last_failure: BaseException | None = None

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self._last_failure = exc

    def success(self, cb: pybreaker.CircuitBreaker) -> None:
        self._last_failure = None  # an opening noticed later was not caused by an older failure

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        old = old_state.name if old_state is not None else "-"
        change = f"circuit breaker {cb.name}: {old} -> {new_state.name}"
        if new_state.name == pybreaker.STATE_OPEN:
            last = self._last_failure
            cause = f"{type(last).__name__}: {last}" if last is not None else "no failure seen here"
            why = (
                "the probe failed" if old == pybreaker.STATE_HALF_OPEN else f"{cb.fail_max} failures in a row"
            )
            log.warning("%s after %s (%s); calls are refused for %g s", change, why, cause, cb.reset_timeout)
        elif new_state.name == pybreaker.STATE_HALF_OPEN:
            log.info("%s: one probe call goes through", change)
        else:
            log.info("%s", change)


class ConcurrentCircuitBreaker(pybreaker.CircuitBreaker):
    def __init__(self, *, slow_call_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slow_call_s = slow_call_s
        self._probe_in_flight = False
        self.add_listener(_LogTransitions())

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        probe = self._admit()
        started = time.monotonic()
        try:
            result = func(*args, **kwargs)
        except BaseException as error:
            self._record(error, probe)
            raise
        elapsed = time.monotonic() - started
        self._record(
            SlowCallError(f"call took {elapsed:.3f}s") if elapsed > self.slow_call_s else None, probe
        )
        return result

    def calling(self) -> Any:
        """Not supported: pybreaker's context manager would bypass the bookkeeping of `call`."""
        raise TypeError("use ConcurrentCircuitBreaker.call()")

    def seconds_until_probe(self) -> float:
        """While open: how long until a half-open probe may go through (0 when it may now)."""
        with self._lock:
            if self.state.name != pybreaker.STATE_OPEN:
                return 0.0
            opened_at = self._state_storage.opened_at
            if opened_at is None:
                return 0.0
            reset_at = opened_at + timedelta(seconds=self.reset_timeout)
            return max((reset_at - datetime.now(UTC)).total_seconds(), 0.0)

    def refuses_now(self) -> bool:
        """True while open and its reset timeout has not passed (cheap check before a call)."""
        return self.seconds_until_probe() > 0

    def _admit(self) -> bool:
        """Let the call through, or raise CircuitBreakerError. True if it is the half-open probe."""
        with self._lock:
            state = self.state
            if state.name == pybreaker.STATE_OPEN:
                if self.seconds_until_probe() > 0:  # pybreaker's lock is reentrant
                    raise pybreaker.CircuitBreakerError("circuit breaker open")
                self.half_open()
                state = self.state
            if state.name == pybreaker.STATE_HALF_OPEN:
                if self._probe_in_flight:
                    raise pybreaker.CircuitBreakerError("circuit breaker half-open: a probe is in flight")
                self._probe_in_flight = True
                return True
            return False

    def _record(self, error: BaseException | None, probe: bool) -> None:
        with self._lock:
            if probe:
                self._probe_in_flight = False
            state = self.state
            if state.name == pybreaker.STATE_HALF_OPEN and not probe:
                # A call let in before the breaker opened: only the probe decides half-open.
                return
            try:
                if error is None:
                    state._handle_success()
                else:
                    state._handle_error(error, reraise=False)
            except pybreaker.CircuitBreakerError:
                pass  # pybreaker announces the trip by raising; the caller has its own error


class RateLimiter:
    """A moving-window limit on calls; `memory://` counts per process, `redis://` across processes."""

    def __init__(self, rate: str, storage_uri: str = "memory://", key: str = "inventory") -> None:
        self._item = parse_rate(rate)
        self._key = key
        # When the shared (Redis) counters cannot be reached, each process falls back to counting
        # on its own: a Redis outage must neither stop the saga nor fail orders.
        self._local = MovingWindowRateLimiter(storage_from_string("memory://"))
        self._shared: MovingWindowRateLimiter | None = None
        if storage_uri != "memory://":
            try:
                self._shared = MovingWindowRateLimiter(storage_from_string(storage_uri))
            except Exception as error:
                log.warning(
                    "rate limiter storage %s unusable (%s): counting per process",
                    storage_uri,
                    type(error).__name__,
                )
        self._warned_at = 0.0

    def _limiter(self) -> MovingWindowRateLimiter:
        return self._shared if self._shared is not None else self._local

    def acquire(self) -> None:
        """Take one slot now or raise RateLimitedError; never waits (the caller defers instead)."""
        try:
            admitted = self._limiter().hit(self._item, self._key)
        except Exception as error:
            if time.monotonic() - self._warned_at > 10:
                log.warning("shared rate limit unavailable (%s): counting per process", type(error).__name__)
                self._warned_at = time.monotonic()
            admitted = self._local.hit(self._item, self._key)
        if not admitted:
            raise RateLimitedError(f"over {self._item}")

    def retry_after_s(self) -> float:
        try:
            stats = self._limiter().get_window_stats(self._item, self._key)
        except Exception:
            stats = self._local.get_window_stats(self._item, self._key)
        return max(stats.reset_time - time.time(), 0.01)


class Guard:
    """Rate limiter, then breaker, around a call to another participant."""

    def __init__(self, breaker: ConcurrentCircuitBreaker, limiter: RateLimiter) -> None:
        self.breaker = breaker
        self.limiter = limiter
        self.denials = 0

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.breaker.refuses_now():  # don't spend a (possibly cluster-wide) rate slot on a refusal
            raise pybreaker.CircuitBreakerError("circuit breaker open")
        try:
            self.limiter.acquire()
        except RateLimitedError:
            self.denials += 1
            raise
        return self.breaker.call(func, *args, **kwargs)
