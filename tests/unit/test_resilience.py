"""The inventory call's guards, without I/O: the concurrent circuit breaker, the rate limiter and the
dispatcher's retry backoff.

The breaker keeps pybreaker's state machine but must (PITFALLS.md) let calls run in parallel, count
slow calls as failures, leave business outcomes alone, and let exactly one probe through when
half-open. Time-based transitions are driven by moving `opened_at` into the past, not by sleeping.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pybreaker
import pytest
import redis

from domain.inventory import Rejected
from saga.resilience import (
    ConcurrentCircuitBreaker,
    FallbackBreakerStorage,
    Guard,
    RateLimitedError,
    RateLimiter,
    SharedStateFallback,
    SlowCallError,
)
from saga.verdicts import backoff_s


class Boom(Exception):
    pass


class Transitions(pybreaker.CircuitBreakerListener):
    """Records what pybreaker tells its listeners."""

    def __init__(self) -> None:
        self.states: list[str] = []
        self.failures: list[BaseException] = []
        self.successes = 0

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.states.append(new_state.name)

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.failures.append(exc)

    def success(self, cb: Any) -> None:
        self.successes += 1


def make_breaker(
    fail_max: int = 3, reset_s: float = 60.0, slow_call_s: float = 5.0
) -> ConcurrentCircuitBreaker:
    return ConcurrentCircuitBreaker(slow_call_s=slow_call_s, fail_max=fail_max, reset_timeout=reset_s)


def fail() -> None:
    raise Boom("inventory down")


def returning_after(seconds: float, result: str) -> Callable[[], str]:
    """A call that takes `seconds`, then returns `result`."""

    def call() -> str:
        time.sleep(seconds)
        return result

    return call


def trip(breaker: ConcurrentCircuitBreaker) -> None:
    for _ in range(breaker.fail_max):
        with pytest.raises(Boom):
            breaker.call(fail)
    assert breaker.current_state == pybreaker.STATE_OPEN


def expire_reset_timeout(breaker: ConcurrentCircuitBreaker) -> None:
    """As if `reset_timeout` had passed since the breaker opened."""
    breaker._state_storage.opened_at = datetime.now(UTC) - timedelta(seconds=breaker.reset_timeout + 1)


# --- opening -------------------------------------------------------------------------------------


def test_the_breaker_opens_after_fail_max_consecutive_failures_and_then_refuses_calls():
    breaker = make_breaker(fail_max=3)
    calls = 0

    def failing() -> None:
        nonlocal calls
        calls += 1
        raise Boom("inventory down")

    for expected_counter in (1, 2):
        with pytest.raises(Boom):
            breaker.call(failing)
        assert breaker.current_state == pybreaker.STATE_CLOSED
        assert breaker.fail_counter == expected_counter
    # The tripping call still raises its own error: the caller learns what went wrong.
    with pytest.raises(Boom):
        breaker.call(failing)
    assert breaker.current_state == pybreaker.STATE_OPEN

    with pytest.raises(pybreaker.CircuitBreakerError):
        breaker.call(failing)
    assert calls == 3, "an open breaker must not call through"


def test_only_consecutive_failures_count_a_success_resets_the_counter():
    breaker = make_breaker(fail_max=3)
    for _ in range(5):
        for _ in range(2):
            with pytest.raises(Boom):
                breaker.call(fail)
        assert breaker.call(lambda: "ok") == "ok"
        assert breaker.fail_counter == 0
    assert breaker.current_state == pybreaker.STATE_CLOSED


def test_a_slow_call_counts_as_a_failure_but_its_result_is_still_returned():
    listener = Transitions()
    breaker = make_breaker(fail_max=3, slow_call_s=0.02)
    breaker.add_listener(listener)

    def slow() -> str:
        time.sleep(0.05)
        return "reserved"

    for expected_counter in (1, 2):
        assert breaker.call(slow) == "reserved"
        assert breaker.fail_counter == expected_counter
        assert breaker.current_state == pybreaker.STATE_CLOSED
    # The third slow call trips the breaker and still hands back its result.
    assert breaker.call(slow) == "reserved"
    assert breaker.current_state == pybreaker.STATE_OPEN
    assert len(listener.failures) == 3
    assert all(isinstance(error, SlowCallError) for error in listener.failures)


def test_a_fast_call_is_a_success_even_right_after_slow_ones():
    breaker = make_breaker(fail_max=3, slow_call_s=0.02)
    assert breaker.call(returning_after(0.05, "slow")) == "slow"
    assert breaker.fail_counter == 1
    assert breaker.call(lambda: "fast") == "fast"
    assert breaker.fail_counter == 0


def test_a_returned_business_outcome_is_never_a_failure():
    breaker = make_breaker(fail_max=2)
    rejected = Rejected("insufficient stock for SKU 'A': requested 5, available 0")
    for _ in range(10):
        assert breaker.call(lambda: rejected) is rejected
    assert breaker.current_state == pybreaker.STATE_CLOSED
    assert breaker.fail_counter == 0


# --- half-open ------------------------------------------------------------------------------------


def test_before_the_reset_timeout_the_open_breaker_does_not_probe():
    breaker = make_breaker(fail_max=1, reset_s=60)
    trip(breaker)
    called = False

    def probe() -> None:
        nonlocal called
        called = True

    with pytest.raises(pybreaker.CircuitBreakerError):
        breaker.call(probe)
    assert not called
    assert breaker.current_state == pybreaker.STATE_OPEN


def test_after_the_reset_timeout_exactly_one_probe_goes_through_while_concurrent_calls_are_refused():
    breaker = make_breaker(fail_max=2, reset_s=30)
    trip(breaker)
    expire_reset_timeout(breaker)

    contenders = 10
    start = threading.Barrier(contenders)
    others_done = threading.Event()
    entered: list[int] = []
    entered_lock = threading.Lock()
    refused = 0
    refused_lock = threading.Lock()

    def protected(index: int) -> str:
        with entered_lock:
            entered.append(index)
        # The probe stays in flight until every other contender has had its answer.
        assert others_done.wait(10), "the other calls never came back"
        return "probe ok"

    def contender(index: int) -> str:
        nonlocal refused
        start.wait(5)
        try:
            return breaker.call(protected, index)
        except pybreaker.CircuitBreakerError:
            with refused_lock:
                refused += 1
                if refused == contenders - 1:
                    others_done.set()
            return "refused"

    with ThreadPoolExecutor(contenders) as pool:
        results = list(pool.map(contender, range(contenders)))

    assert len(entered) == 1, f"{len(entered)} probes went through half-open"
    assert sorted(results) == ["probe ok"] + ["refused"] * (contenders - 1)
    # ... and the successful probe closed the breaker.
    assert breaker.current_state == pybreaker.STATE_CLOSED
    assert breaker.call(lambda: "again") == "again"


def test_a_call_arriving_while_the_probe_is_in_flight_is_refused_without_being_run():
    breaker = make_breaker(fail_max=1)
    trip(breaker)
    expire_reset_timeout(breaker)
    probe_entered, release_probe = threading.Event(), threading.Event()

    def probe() -> str:
        probe_entered.set()
        assert release_probe.wait(10)
        return "ok"

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(breaker.call, probe)
        assert probe_entered.wait(5)
        assert breaker.current_state == pybreaker.STATE_HALF_OPEN
        ran = False

        def second() -> None:
            nonlocal ran
            ran = True

        with pytest.raises(pybreaker.CircuitBreakerError):
            breaker.call(second)
        assert not ran
        release_probe.set()
        assert pending.result(5) == "ok"
    assert breaker.current_state == pybreaker.STATE_CLOSED


def test_a_successful_probe_closes_the_breaker_and_calls_flow_again():
    listener = Transitions()
    breaker = make_breaker(fail_max=2)
    breaker.add_listener(listener)
    trip(breaker)
    expire_reset_timeout(breaker)

    assert breaker.call(lambda: "probe") == "probe"

    assert breaker.current_state == pybreaker.STATE_CLOSED
    assert breaker.fail_counter == 0
    assert listener.states == [pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN, pybreaker.STATE_CLOSED]
    assert [breaker.call(lambda i=i: i) for i in range(5)] == list(range(5))


def test_a_failed_probe_reopens_the_breaker_for_another_reset_timeout():
    listener = Transitions()
    breaker = make_breaker(fail_max=2, reset_s=30)
    breaker.add_listener(listener)
    trip(breaker)
    expire_reset_timeout(breaker)
    before = datetime.now(UTC)

    with pytest.raises(Boom):
        breaker.call(fail)

    assert breaker.current_state == pybreaker.STATE_OPEN
    opened_at = breaker._state_storage.opened_at
    assert opened_at is not None and opened_at >= before, "the reset timeout must start again"
    assert listener.states == [pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN, pybreaker.STATE_OPEN]
    with pytest.raises(pybreaker.CircuitBreakerError):
        breaker.call(lambda: "too soon")


def test_a_slow_probe_reopens_the_breaker_but_returns_its_result():
    breaker = make_breaker(fail_max=1, slow_call_s=0.02)
    trip(breaker)
    expire_reset_timeout(breaker)

    assert breaker.call(returning_after(0.05, "late")) == "late"

    assert breaker.current_state == pybreaker.STATE_OPEN


def test_a_refused_call_does_not_leave_the_probe_slot_taken():
    """After a failed probe and another reset timeout, the next probe must be admitted."""
    breaker = make_breaker(fail_max=1)
    trip(breaker)
    for _ in range(3):
        expire_reset_timeout(breaker)
        with pytest.raises(Boom):
            breaker.call(fail)
        assert breaker.current_state == pybreaker.STATE_OPEN
    expire_reset_timeout(breaker)
    assert breaker.call(lambda: "finally") == "finally"
    assert breaker.current_state == pybreaker.STATE_CLOSED


# --- parallelism ---------------------------------------------------------------------------------


def _elapsed_of_parallel_calls(
    call: Callable[[Callable[[], None]], Any], threads: int, work_s: float
) -> float:
    """Start `threads` calls of `call(work)` at one barrier; seconds until the last one returns."""
    start = threading.Barrier(threads + 1)

    def work() -> None:
        time.sleep(work_s)

    def worker() -> None:
        start.wait(5)
        call(work)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    start.wait(5)
    began = time.perf_counter()
    for thread in pool:
        thread.join(30)
    return time.perf_counter() - began


def test_calls_through_one_breaker_run_in_parallel_where_plain_pybreaker_serialises_them():
    threads, work_s = 10, 0.2
    serial = _elapsed_of_parallel_calls(pybreaker.CircuitBreaker(fail_max=5).call, threads, work_s)
    concurrent = _elapsed_of_parallel_calls(make_breaker(slow_call_s=5).call, threads, work_s)

    # The baseline proves the measurement can tell the difference: pybreaker's lock serialises.
    assert serial >= 0.8 * threads * work_s
    assert concurrent / serial < 0.3, f"parallel calls took {concurrent:.2f}s vs {serial:.2f}s serialised"


def test_every_caller_is_inside_the_protected_call_at_the_same_time():
    """A barrier inside the protected call only opens if all ten callers are in it at once."""
    threads = 10
    inside = threading.Barrier(threads)
    breaker = make_breaker(slow_call_s=5)

    def protected() -> int:
        return inside.wait(5)  # BrokenBarrierError (a failure) if the breaker serialised the calls

    with ThreadPoolExecutor(threads) as pool:
        results = [f.result(10) for f in [pool.submit(breaker.call, protected) for _ in range(threads)]]
    assert sorted(results) == list(range(threads))
    assert breaker.current_state == pybreaker.STATE_CLOSED


# --- rate limiter --------------------------------------------------------------------------------


def test_the_rate_limiter_admits_the_limit_then_refuses_without_waiting():
    limiter = RateLimiter("5/second")
    for _ in range(5):
        limiter.acquire()
    began = time.perf_counter()
    with pytest.raises(RateLimitedError):
        limiter.acquire()
    assert time.perf_counter() - began < 0.1, "acquire must never wait"
    assert 0 < limiter.retry_after_s() <= 1.0


def test_the_rate_limiter_gives_a_batch_as_many_permits_as_the_window_has_left():
    limiter = RateLimiter("5/minute")

    assert limiter.acquire_up_to(3) == 3
    assert limiter.acquire_up_to(3) == 2, "the two left, not none"
    assert limiter.acquire_up_to(1) == 0
    with pytest.raises(RateLimitedError):
        limiter.acquire()


def test_the_guard_runs_a_batch_as_one_breaker_call_with_the_permits_it_got():
    guard = Guard(make_breaker(fail_max=1), RateLimiter("4/minute"))
    calls: list[int] = []
    transitions = Transitions()
    guard.breaker.add_listener(transitions)

    def reserve(granted: int) -> int:
        calls.append(granted)
        return granted

    assert guard.call_for(3, reserve) == 3
    assert guard.call_for(3, reserve) == 1
    with pytest.raises(RateLimitedError):
        guard.call_for(3, reserve)

    assert calls == [3, 1], "the second batch got the one permit left and ran for it"
    assert transitions.successes == 2, "the breaker saw one call per batch"
    assert guard.denials == 2 + 3, "every order deferred counts as a denial"


def test_the_in_process_limiter_starts_no_thread_per_hit(monkeypatch: pytest.MonkeyPatch):
    limiter = RateLimiter("1000/second")
    started: list[threading.Timer] = []

    class CountedTimer(threading.Timer):
        def start(self) -> None:
            started.append(self)
            super().start()

    monkeypatch.setattr(threading, "Timer", CountedTimer)
    for _ in range(20):
        limiter.acquire()
        time.sleep(0.012)  # past the storage's 10 ms expiry period: limits' own storage starts a timer

    assert started == []


def test_the_in_process_limiter_drops_entries_whose_window_has_passed():
    limiter = RateLimiter("3/second")
    for _ in range(3):
        limiter.acquire()
    time.sleep(1.05)  # the one-second window passes

    limiter.acquire()

    # What the storage still holds (limits' own attributes): the last hit's entry alone.
    storage: Any = limiter._local.storage
    assert [len(entries) for entries in storage.events.values()] == [1]


def test_limiters_with_their_own_memory_storage_count_separately():
    first, second = RateLimiter("2/second"), RateLimiter("2/second")
    for _ in range(2):
        first.acquire()
    second.acquire()
    with pytest.raises(RateLimitedError):
        first.acquire()


def test_the_guard_asks_the_limiter_before_the_breaker_and_runs_nothing_when_limited():
    guard = Guard(make_breaker(fail_max=1), RateLimiter("1/minute"))
    assert guard.call(lambda: "first") == "first"
    ran = False

    def second() -> None:
        nonlocal ran
        ran = True

    with pytest.raises(RateLimitedError):
        guard.call(second)
    assert not ran
    assert guard.breaker.current_state == pybreaker.STATE_CLOSED, "being limited is not a failure"


# --- backoff -------------------------------------------------------------------------------------


class Extreme(random.Random):
    """A random source that always draws the lowest (or highest) value of the range."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(0, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 10.0), (7, 10.0), (50, 10.0)],
)
def test_backoff_grows_exponentially_up_to_the_cap_with_jitter_between_half_and_full(attempt, ceiling):
    assert backoff_s(attempt, 0.5, 10.0, Extreme(high=True)) == pytest.approx(ceiling)
    assert backoff_s(attempt, 0.5, 10.0, Extreme(high=False)) == pytest.approx(ceiling / 2)
    rng = random.Random(attempt)
    draws = [backoff_s(attempt, 0.5, 10.0, rng) for _ in range(500)]
    assert all(ceiling / 2 <= d <= ceiling for d in draws)
    assert max(draws) - min(draws) > ceiling / 4, "no jitter: retries of many events would come back at once"


def test_backoff_without_a_random_source_stays_in_range_and_never_exceeds_the_cap():
    for attempt in range(1, 40):
        ceiling = min(60.0, 0.5 * 2 ** (attempt - 1))
        delay = backoff_s(attempt, 0.5, 60.0)
        assert ceiling / 2 <= delay <= ceiling <= 60.0


# --- what an operator reads --------------------------------------------------------------------


def test_every_state_change_of_the_breaker_is_logged_opening_as_a_warning(caplog):
    breaker = ConcurrentCircuitBreaker(slow_call_s=5.0, fail_max=2, reset_timeout=30, name="inventory")
    with caplog.at_level("INFO", logger="saga.resilience"):
        trip(breaker)
        expire_reset_timeout(breaker)
        breaker.call(lambda: "probe")

    changes = [(r.levelname, r.getMessage()) for r in caplog.records if "circuit breaker" in r.getMessage()]
    assert changes == [
        (
            "WARNING",
            "circuit breaker inventory: closed -> open after 2 failures in a row (Boom: inventory down); "
            "calls are refused for 30 s",
        ),
        ("INFO", "circuit breaker inventory: open -> half-open: one probe call goes through"),
        ("INFO", "circuit breaker inventory: half-open -> closed"),
    ]


def test_an_opening_noticed_through_shared_state_blames_no_failure_of_its_own(caplog):
    """Two processes sharing the breaker's state (Redis in production): the one that did not fail
    says so, instead of naming some older failure of its own."""
    shared = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    tripping, noticing = (
        ConcurrentCircuitBreaker(
            slow_call_s=5.0, fail_max=2, reset_timeout=30, state_storage=shared, name="inventory"
        )
        for _ in range(2)
    )
    with pytest.raises(Boom):
        noticing.call(fail)  # an old failure of its own
    assert noticing.call(lambda: "fine") == "fine"
    with caplog.at_level("INFO", logger="saga.resilience"):
        trip(tripping)
        with pytest.raises(pybreaker.CircuitBreakerError):
            noticing.call(lambda: "refused")

    openings = [r.getMessage() for r in caplog.records if "-> open" in r.getMessage()]
    assert openings == [
        "circuit breaker inventory: closed -> open after 2 failures in a row (Boom: inventory down); "
        "calls are refused for 30 s",
        "circuit breaker inventory: closed -> open after 2 failures in a row (no failure seen here); "
        "calls are refused for 30 s",
    ]


# --- shared state (Redis) that fails: per-process counting meanwhile --------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SilentRedis:
    """A Redis client whose every command fails as one past its socket timeout does."""

    def __init__(self) -> None:
        self.commands = 0

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def command(*_args: Any, **_kwargs: Any) -> Any:
            self.commands += 1
            raise redis.TimeoutError("Timeout reading from socket")

        return command


def test_a_failing_shared_store_sends_callers_to_local_state_with_one_warning_and_one_retry_per_interval(
    caplog,
):
    clock = Clock()
    fallback = SharedStateFallback(retry_s=5.0, clock=clock)
    tries = 0

    def shared() -> str:
        nonlocal tries
        tries += 1
        raise redis.ConnectionError("Connection refused")

    with caplog.at_level("INFO", logger="saga.resilience"):
        assert [fallback.run(shared, lambda: "local") for _ in range(10)] == ["local"] * 10
        assert (tries, fallback.down) == (1, True)  # the others did not wait on Redis
        clock.now += 5.0
        assert [fallback.run(shared, lambda: "local") for _ in range(10)] == ["local"] * 10
        assert tries == 2  # one retry per interval
        clock.now += 5.0
        assert fallback.run(lambda: "shared", lambda: "local") == "shared"
        assert fallback.run(lambda: "shared", lambda: "local") == "shared"

    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            "WARNING",
            "shared guard state (Redis) unavailable (ConnectionError: Connection refused): rate limit and "
            "circuit breaker count per process until it answers; trying again every 5 s",
        ),
        ("INFO", "shared guard state (Redis) answers again after 10.0 s: counting is shared again"),
    ]
    assert (fallback.down, fallback.outages, fallback.failures) == (False, 1, 2)


def test_a_breaker_on_a_silent_redis_counts_and_opens_in_this_process_without_a_traceback_per_call(caplog):
    client = SilentRedis()
    fallback = SharedStateFallback(retry_s=60.0)
    breaker = ConcurrentCircuitBreaker(
        slow_call_s=5.0,
        fail_max=3,
        reset_timeout=60,
        state_storage=FallbackBreakerStorage(client, "orders-inventory", fallback),  # type: ignore[arg-type]
    )
    with caplog.at_level("INFO"):
        trip(breaker)  # pybreaker's own Redis storage would read "closed" for ever
        with pytest.raises(pybreaker.CircuitBreakerError):
            breaker.call(lambda: "refused")

    assert client.commands == 1, "after the first failure, Redis is left alone until the retry"
    assert [r for r in caplog.records if r.exc_info] == []
    [outage] = [r.getMessage() for r in caplog.records if "shared guard state" in r.getMessage()]
    assert outage.startswith("shared guard state (Redis) unavailable (TimeoutError: Timeout reading")
