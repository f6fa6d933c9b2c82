"""The outbox dispatcher: one thread that claims due events and runs their handlers on a bounded pool.

It knows event types and handlers, nothing of what an event means. Per process:

- one dispatcher thread claims at most as many events as the executor has free slots (the
  bulkhead), so a claimed event never waits in a queue while its lease runs down;
- each handler runs on the executor with the event's correlation id (and order id) restored in a
  fresh context: an executor does not carry contextvars by itself;
- the handler's verdict is written back fenced on the lease token (see `db.outbox`): DONE, a
  retry later (exponential backoff with jitter, an attempt counted), a deferral (not an attempt:
  the breaker is open or the rate limit says wait), or DEAD after `max_attempts`;
- the thread sleeps until woken (local commit, a PostgreSQL notification) or the poll interval
  passes, which alone guarantees progress.
"""

from __future__ import annotations

import contextvars
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from db.outbox import ClaimedEvent
from db.unit_of_work import OrdersUnitOfWork
from domain import correlation
from domain.model import utcnow
from saga.faults import FaultSwitches
from saga.signals import WakeUp

log = logging.getLogger("orders.dispatcher")


@dataclass(frozen=True)
class Done:
    """The event is handled; never run it again."""


@dataclass(frozen=True)
class Retry:
    """A transient failure: run again after a backoff; counts as an attempt."""

    error: str


@dataclass(frozen=True)
class Defer:
    """Not now (breaker open, rate limited): run again after `delay_s`; not an attempt."""

    delay_s: float
    reason: str


Verdict = Done | Retry | Defer
Handler = Callable[[ClaimedEvent], Verdict]


@dataclass(frozen=True)
class DispatcherSettings:
    workers: int = 8
    poll_interval_s: float = 1.0
    lease_s: float = 30.0
    max_attempts: int = 8
    retry_base_s: float = 0.5
    retry_max_s: float = 60.0


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before attempt `attempt + 1`: exponential, capped, with "equal jitter" (half fixed,
    half random) so that retries of many events spread out but never come back at once."""
    ceiling = min(max_s, base_s * 2.0 ** max(attempt - 1, 0))
    return ceiling / 2 + float((rng or random).uniform(0, ceiling / 2))


@dataclass
class DispatcherStats:
    """Counters for tests, logs and metrics; updated under the dispatcher's lock."""

    claimed: int = 0
    done: int = 0
    retried: int = 0
    deferred: int = 0
    dead: int = 0
    fenced: int = 0  # completions refused because the lease had passed to another process


Listener = Callable[[str, ClaimedEvent, float], None]  # (outcome, event, handler seconds)


class OutboxDispatcher:
    """Claims outbox events and runs their handlers; `start()` it once, `stop()` it once."""

    def __init__(
        self,
        uow: Callable[[], OrdersUnitOfWork],
        handlers: Mapping[str, Handler],
        settings: DispatcherSettings,
        wake: WakeUp | None = None,
        clock: Callable[[], datetime] = utcnow,
        listener: Listener | None = None,
        faults: FaultSwitches | None = None,
        on_claimed: Callable[[ClaimedEvent, float], None] | None = None,
    ) -> None:
        self._uow = uow
        self._handlers = dict(handlers)
        self._settings = settings
        self._wake = wake or WakeUp()
        self._clock = clock
        self._listener = listener
        self._faults = faults or FaultSwitches()
        self._on_claimed = on_claimed
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified whenever a handler finishes
        self._in_flight = 0
        self._stopping = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="saga")
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self.stats = DispatcherStats()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float) -> bool:
        """Stop claiming, let running handlers finish for up to `timeout` seconds. True if all did;
        events still running past it keep their lease, which expires and hands them to another
        process."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        with self._idle:
            finished = self._idle.wait_for(
                lambda: self._in_flight == 0, timeout=max(deadline - time.monotonic(), 0.0)
            )
        self._executor.shutdown(wait=finished, cancel_futures=True)
        return finished

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            free = self._settings.workers - self.in_flight
            claimed = 0
            if free > 0:
                try:
                    claimed = self._claim_and_submit(free)
                    failures = 0
                except Exception as error:
                    failures += 1
                    cap = max(5 * self._settings.poll_interval_s, 5.0)
                    pause = min(self._settings.poll_interval_s * 2**failures, cap)
                    log.warning(
                        "claiming outbox events failed (%s); next try in %.1fs", _describe(error), pause
                    )
                    # A wake-up (a commit here, a notification once the database is back) ends the
                    # pause early, so sagas resume as soon as the database answers again.
                    self._wake.wait(pause)
                    continue
            if claimed and claimed == free:
                continue  # a full batch: there may be more due right now
            self._wake.wait(self._settings.poll_interval_s)

    def _claim_and_submit(self, free: int) -> int:
        now = self._clock()
        with self._uow() as uow:
            events = uow.outbox.claim(free, timedelta(seconds=self._settings.lease_s), now)
            uow.commit()
        for event in events:
            lag_s = max((event.claimed_at - event.created_at).total_seconds(), 0.0)
            with self._lock:
                self._in_flight += 1
                self.stats.claimed += 1
            if self._on_claimed is not None:
                self._on_claimed(event, lag_s)
            # A fresh context per task: one context entered by two threads at once raises.
            context = contextvars.Context()
            self._executor.submit(context.run, self._handle, event)
        return len(events)

    def _handle(self, event: ClaimedEvent) -> None:
        correlation.set_current(event.correlation_id)
        correlation.set_order_id(event.aggregate_id)
        started = time.perf_counter()
        # The benchmark pairs this line with the PlaceOrder call of the same correlation id to
        # measure pickup latency (call start -> handler start).
        log.debug("handling %s event %d", event.event_type, event.id)
        try:
            verdict = self._verdict(event)
            self._faults.maybe_delay("handler_delay_s")
            self._faults.maybe_crash("crash_before_complete")
            outcome = self._record(event, verdict)
            if self._listener is not None:
                self._listener(outcome, event, time.perf_counter() - started)
        except Exception as error:
            # Recording failed (database gone?): the lease expires and the event runs again.
            log.warning("could not record the outcome of event %d: %s", event.id, _describe(error))
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
            self._wake.set()

    def _verdict(self, event: ClaimedEvent) -> Verdict:
        handler = self._handlers.get(event.event_type)
        if handler is None:
            return Retry(f"no handler for event type {event.event_type!r}")
        try:
            return handler(event)
        except Exception as error:
            log.warning("handler of %s event %d failed: %s", event.event_type, event.id, _describe(error))
            return Retry(_describe(error))

    def _record(self, event: ClaimedEvent, verdict: Verdict) -> str:
        now = self._clock()
        with self._uow() as uow:
            if isinstance(verdict, Done):
                outcome, kept = "done", uow.outbox.complete(event, now)
            elif isinstance(verdict, Defer):
                later = now + timedelta(seconds=verdict.delay_s)
                outcome, kept = "deferred", uow.outbox.reschedule(event, later, now, verdict.reason, False)
            elif event.attempts + 1 >= self._settings.max_attempts:
                outcome, kept = "dead", uow.outbox.bury(event, verdict.error, now)
                log.error(
                    "event %d (%s) is DEAD after %d attempts: %s",
                    event.id,
                    event.event_type,
                    event.attempts + 1,
                    verdict.error,
                )
            else:
                delay = backoff_s(event.attempts + 1, self._settings.retry_base_s, self._settings.retry_max_s)
                later = now + timedelta(seconds=delay)
                outcome, kept = "retried", uow.outbox.reschedule(event, later, now, verdict.error, True)
            uow.commit()
        with self._lock:
            if not kept:
                self.stats.fenced += 1
            else:
                setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        if not kept:
            log.warning(
                "event %d: lease lost to another dispatcher; outcome %r not recorded", event.id, outcome
            )
            return "fenced"
        return outcome


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:500]
