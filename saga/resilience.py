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

With Redis, the limiter's counters and the breaker's state are shared by every process. When Redis
fails (refused, or silent past its socket timeout), `SharedStateFallback` sends both to the
process's own memory state: one warning per outage, Redis tried again now and then by one caller,
and shared counting resumes when it answers. pybreaker's Redis storage would otherwise log a
traceback per call and read "closed" whatever happened, so no breaker could open during an outage.

Why one module of this size: the breaker, the limiter and the Redis fallback they share are one
guard, and their Redis failure handling has to agree.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pybreaker
import redis
from limits import parse as parse_rate
from limits.errors import StorageError
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from limits.util import WindowStats

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


# What a shared store that stopped answering raises (redis-py wraps socket errors in these).
SHARED_STATE_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, StorageError, OSError)


class SharedStateFallback:
    """Shared (Redis) guard state while it answers; each process's own state while it does not.

    The first failure of an outage logs one warning and sends every caller to its local state;
    every `retry_s` one caller tries Redis again while the others stay local, and the first answer
    logs the recovery. A silent Redis costs each caller in flight one socket timeout, no more.
    """

    def __init__(self, retry_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._retry_s = retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._next_try = 0.0
        self.outages = 0  # times Redis went from answering to failing
        self.failures = 0  # shared calls that failed, first ones of outages and retries alike

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def run(self, shared: Callable[[], T], local: Callable[[], T]) -> T:
        """`shared()`, or `local()` while the shared store is down or when `shared()` fails."""
        if not self._may_try():
            return local()
        try:
            result = shared()
        except SHARED_STATE_ERRORS as error:
            self._failed(error)
            return local()
        self._answered()
        return result

    def _may_try(self) -> bool:
        with self._lock:
            if self._down_since is None:
                return True
            now = self._clock()
            if now < self._next_try:
                return False
            self._next_try = now + self._retry_s  # this caller tries; the others stay local meanwhile
            return True

    def _failed(self, error: Exception) -> None:
        with self._lock:
            now = self._clock()
            self._next_try = now + self._retry_s
            self.failures += 1
            if self._down_since is not None:
                return
            self._down_since = now
            self.outages += 1
        log.warning(
            "shared guard state (Redis) unavailable (%s: %s): rate limit and circuit breaker count "
            "per process until it answers; trying again every %g s",
            type(error).__name__,
            error,
            self._retry_s,
        )

    def _answered(self) -> None:
        if self._down_since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._down_since is None:
                return
            lasted = self._clock() - self._down_since
            self._down_since = None
        log.info("shared guard state (Redis) answers again after %.1f s: counting is shared again", lasted)


class _RaiseInstead:
    """Stands in for the logger of pybreaker's Redis storage, which logs every Redis error with a
    traceback and carries on with a default ("closed", 0). Called inside pybreaker's `except`
    block, the bare `raise` re-raises the Redis error for `SharedStateFallback` to see."""

    def exception(self, *_args: Any, **_kwargs: Any) -> None:
        raise


class _RaisingRedisStorage(pybreaker.CircuitRedisStorage):
    logger = _RaiseInstead()  # type: ignore[assignment]


class FallbackBreakerStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker's Redis storage while Redis answers, a memory storage of this process's own while
    it does not (`SharedStateFallback` decides which)."""

    def __init__(self, client: redis.Redis, namespace: str, fallback: SharedStateFallback) -> None:
        super().__init__("redis")
        self._client = client
        self._namespace = namespace
        self._fallback = fallback
        self._local = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._redis: pybreaker.CircuitRedisStorage | None = None

    def _shared(self) -> pybreaker.CircuitRedisStorage:
        # Made at first use, not at start: Redis may be down when the process starts.
        if self._redis is None:
            self._redis = _RaisingRedisStorage(
                pybreaker.STATE_CLOSED, self._client, namespace=self._namespace
            )
        return self._redis

    def _read(self, name: str) -> Any:
        return self._fallback.run(lambda: getattr(self._shared(), name), lambda: getattr(self._local, name))

    def _write(self, name: str, value: Any) -> None:
        self._fallback.run(
            lambda: setattr(self._shared(), name, value), lambda: setattr(self._local, name, value)
        )

    def _do(self, name: str) -> None:
        self._fallback.run(lambda: getattr(self._shared(), name)(), lambda: getattr(self._local, name)())

    @property
    def state(self) -> str:
        return str(self._read("state"))

    @state.setter
    def state(self, state: str) -> None:
        self._write("state", state)

    def increment_counter(self) -> None:
        self._do("increment_counter")

    def reset_counter(self) -> None:
        self._do("reset_counter")

    def increment_success_counter(self) -> None:
        self._do("increment_success_counter")

    def reset_success_counter(self) -> None:
        self._do("reset_success_counter")

    @property
    def counter(self) -> int:
        return int(self._read("counter"))

    @property
    def success_counter(self) -> int:
        return int(self._read("success_counter"))

    @property
    def opened_at(self) -> datetime | None:
        value: datetime | None = self._read("opened_at")
        return value

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:
        self._write("opened_at", now)


class _MemoryWindow(MemoryStorage):
    """`limits`' in-process storage, its expired entries dropped by the hits themselves.

    `MemoryStorage` drops them on a `threading.Timer` of 10 ms, which the first hit after the last
    timer ended starts again: under a steady load of saga steps, a thread start every few hits
    (docs/performance.md, "Fifth round"). Here a hit that finds the last expiry 10 ms old runs it
    in its own thread instead. The expiry only bounds memory: the moving window counts by the
    entries' times either way. This overrides a private method of limits 5 (name-mangled); if a
    later version renames it, the timers come back and nothing else changes."""

    _EVERY_S = 0.01

    def __init__(self) -> None:
        super().__init__()
        self._expired_at = time.monotonic()
        self._expiring = threading.Lock()

    def _MemoryStorage__schedule_expiry(self) -> None:  # the name MemoryStorage calls
        now = time.monotonic()
        if now - self._expired_at < self._EVERY_S or not self._expiring.acquire(blocking=False):
            return
        try:
            self._expired_at = now
            getattr(self, "_MemoryStorage__expire_events")()  # noqa: B009 - name-mangled
        finally:
            self._expiring.release()


class RateLimiter:
    """A moving-window limit on calls; `memory://` counts per process, `redis://` across processes."""

    def __init__(
        self,
        rate: str,
        storage_uri: str = "memory://",
        key: str = "inventory",
        *,
        fallback: SharedStateFallback | None = None,
        storage_options: Mapping[str, float] | None = None,
    ) -> None:
        self._item = parse_rate(rate)
        self._key = key
        # When the shared (Redis) counters cannot be reached, each process falls back to counting
        # on its own: a Redis outage must neither stop the saga nor fail orders.
        self._local = MovingWindowRateLimiter(_MemoryWindow())
        self._shared: MovingWindowRateLimiter | None = None
        self._fallback = fallback or SharedStateFallback(retry_s=5.0)
        if storage_uri != "memory://":
            try:
                self._shared = MovingWindowRateLimiter(
                    storage_from_string(storage_uri, **dict(storage_options or {}))
                )
            except Exception as error:
                log.warning(
                    "rate limiter storage %s unusable (%s): counting per process",
                    storage_uri,
                    type(error).__name__,
                )

    @property
    def rate(self) -> str:
        return str(self._item)

    def acquire(self) -> None:
        """Take one slot now or raise RateLimitedError; never waits (the caller defers instead)."""
        if not self._hit(1):
            raise RateLimitedError(f"over {self._item}")

    def acquire_up_to(self, wanted: int) -> int:
        """Take up to `wanted` slots now, as many as the window has left: the number taken (0:
        none). A hit of several slots takes all or none, so when `wanted` do not fit, this asks
        the window what is left and takes that (again, if another caller took it meanwhile)."""
        if self._hit(wanted):
            return wanted
        for _ in range(2):
            left = min(wanted, self._stats().remaining)
            if left <= 0:
                return 0
            if self._hit(left):
                return left
        return 0

    def retry_after_s(self) -> float:
        return max(self._stats().reset_time - time.time(), 0.01)

    def _hit(self, cost: int) -> bool:
        shared = self._shared
        if shared is None:
            return self._local.hit(self._item, self._key, cost=cost)
        return self._fallback.run(
            lambda: shared.hit(self._item, self._key, cost=cost),
            lambda: self._local.hit(self._item, self._key, cost=cost),
        )

    def _stats(self) -> WindowStats:
        shared = self._shared

        def local() -> WindowStats:
            return self._local.get_window_stats(self._item, self._key)

        if shared is None:
            return local()
        return self._fallback.run(lambda: shared.get_window_stats(self._item, self._key), local)


class Guard:
    """Rate limiter, then breaker, around a call to another participant."""

    def __init__(
        self,
        breaker: ConcurrentCircuitBreaker,
        limiter: RateLimiter,
        shared_state: SharedStateFallback | None = None,
    ) -> None:
        self.breaker = breaker
        self.limiter = limiter
        self.shared_state = shared_state  # None: both count per process, by configuration
        self.denials = 0

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.call_for(1, lambda _granted: func(*args, **kwargs))

    def call_for(self, wanted: int, func: Callable[[int], T]) -> T:
        """`func(granted)` with up to `wanted` rate permits taken (one per order of a batch): the
        breaker sees one call. RateLimitedError when not one permit is left; with fewer than
        `wanted`, `func` does the part it got permits for and its caller defers the rest."""
        if self.breaker.refuses_now():  # don't spend a (possibly cluster-wide) rate slot on a refusal
            raise pybreaker.CircuitBreakerError("circuit breaker open")
        granted = self.limiter.acquire_up_to(wanted)
        self.denials += wanted - granted
        if granted == 0:
            raise RateLimitedError(f"over {self.limiter.rate}")
        return self.breaker.call(func, granted)
