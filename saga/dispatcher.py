"""The outbox dispatcher: a thread that decides when to claim due events, and a bounded pool of
workers that run their handlers.

It knows event types and handlers, nothing of what an event means. Per process:

- a round (the DONE marks and a claim, one statement on PostgreSQL) claims events for the pool's
  `workers` threads (the bulkhead) and at most one batch ahead of them (`workers` more, waiting
  in the pool's queue), and only while some worker is idle: a worker that finishes finds its
  next event already there, while workers all stuck on slow handlers claim nothing more. One
  still queued when the dispatcher stops is handed back at once (a deferral), not left to its
  lease;
- while rounds come back full (a backlog), two rounds of up to `2 * workers` run at once (each
  started while a worker is idle, and claiming `workers` events at least), and up to
  `4 * workers` events may be held (running, queued, being claimed): one round's statement is in
  the database while the other's events are handed to the workers. One round at a time,
  the workers and the database took turns: in a no-op drain the process held the GIL 40-60 % of
  the time and PostgreSQL one core of two, and two rounds at once drained 21 and 36 % more events
  a second (two alternated pairs). Rounds run on two round threads; the dispatcher thread only starts
  them. After a failed round, one at a time again;
- each handler runs on the executor with the event's correlation id (and order id) restored in a
  fresh context: an executor does not carry contextvars by itself;
- the handler's verdict is written back fenced on the lease token (see `db.outbox`): DONE, a
  retry later (exponential backoff with jitter), a deferral (the attempt its claim counted is
  given back: the breaker is open or the rate limit says wait), or DEAD after `max_attempts`.
  A claim counts the attempt, so an event whose handler kills the process is claimed once more
  than `max_attempts` and then buried unrun, its cause kept;
- leases are the database's (`db.clock`): while events are held, their leases are renewed every
  third of `lease_s`, and an event whose lease ran out before a worker took it (the process
  stalled) is handed back, not started: its lease may already be another process's;
- DONE is written in batches: finished events wait for the dispatcher thread, which marks them
  all DONE in the transaction of its next claim (one statement for the batch), or on their own
  once two batches' worth have gathered or nothing is left running. A handler that
  writes in the orders database can instead complete its event in its own transaction
  (`Completed`), so its effect and the DONE are one commit, fenced together;
- the thread sleeps until woken (local commit, a PostgreSQL notification) or the poll interval
  passes, which alone guarantees progress. A finished handler wakes it only when that can find
  work: the last claim was a full batch or there was no worker free to claim for (more may be
  due), DONEs are waiting to be written (see
  above), or a later event of the same order was committed here meanwhile (`note_committed`; it
  could not be claimed while this one ran). Waking on every finish made one claim transaction
  per event that mostly found nothing;
- hand-off: an event this process is about to commit, while a worker is idle, skips the claim.
  `take_slots` reserves the worker and gives a lease, the event is written already leased to
  this process (no other dispatcher can take it), and `hand` runs it once committed: no wake-up,
  no claim transaction, and no waiting for the dispatcher thread. If the process dies first, the
  lease runs out and any dispatcher claims the event as usual.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from db.outbox import ClaimedEvent, Lease
from db.unit_of_work import OrdersUowFactory
from domain import correlation
from domain.model import utcnow
from saga.faults import FaultSwitches
from saga.signals import WakeUp

log = logging.getLogger("orders.dispatcher")


@dataclass(frozen=True)
class Done:
    """The event is handled; never run it again."""


@dataclass(frozen=True)
class Completed:
    """The handler marked the event DONE itself, in the transaction of its own writes, fenced on the
    lease (`OutboxStore.complete`). `kept=False`: the lease had passed to another process, so the
    handler wrote nothing."""

    kept: bool = True


@dataclass(frozen=True)
class Retry:
    """A transient failure: run again after a backoff; counts as an attempt."""

    error: str


@dataclass(frozen=True)
class Defer:
    """Not now (breaker open, rate limited): run again after `delay_s`; not an attempt."""

    delay_s: float
    reason: str


Verdict = Done | Completed | Retry | Defer
Handler = Callable[[ClaimedEvent], Verdict]


@dataclass(frozen=True)
class DispatcherSettings:
    workers: int = 8
    poll_interval_s: float = 1.0
    lease_s: float = 30.0
    max_attempts: int = 8
    retry_base_s: float = 0.5
    retry_max_s: float = 60.0
    # How long events may wait for a claim while newer ones are handed over before hand-offs
    # stop until the claim is made (see `take_slots`).
    handoff_yield_after_s: float = 0.05


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
    expired: int = 0  # handed back unrun: the lease ran out before a worker took the event
    renewed: int = 0  # leases extended while their events were held


Listener = Callable[[str, ClaimedEvent, float], None]  # (outcome, event, handler seconds)

# Rounds (DONE marks and a claim) in flight at once while rounds come back full (see above).
_ROUNDS = 2


class OutboxDispatcher:
    """Claims outbox events and runs their handlers; `start()` it once, `stop()` it once."""

    def __init__(
        self,
        uow: OrdersUowFactory,
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
        self._reserved = 0  # workers promised to events being committed (`take_slots`)
        # Since when (monotonic) a claim is owed: the last claim filled its batch, or a wake-up
        # found no worker free, so more events may be due than were claimed; None when not.
        self._owed_since: float | None = None
        self._running: dict[str, int] = {}  # aggregates of the events in flight, with counts
        # Events in flight (queued or running) with the time.monotonic() by which their lease
        # runs out at the latest, counted from before the statement that took it.
        self._held: dict[int, tuple[ClaimedEvent, float]] = {}
        self._next_renewal = 0.0
        self._followed: set[str] = set()  # running aggregates with a later event committed here
        self._started = False
        # Handled events waiting to be marked DONE, with their handler seconds (under the lock).
        self._finished: list[tuple[ClaimedEvent, float]] = []
        self._rounds = 0  # rounds in flight
        self._claiming = 0  # events the rounds in flight may claim
        self._wanted = 1  # rounds to start (one at start-up, for what was committed before)
        self._full = False  # the last round claimed all it asked for: more may be due
        self._failures = 0  # rounds failed in a row
        self._pause = 0.0  # seconds to wait before the next round, after a failure
        self._stopping = threading.Event()
        self._executor = WorkerPool(settings.workers, "saga")
        self._round_threads = WorkerPool(_ROUNDS, "dispatcher-round")
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self.stats = DispatcherStats()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def stopping(self) -> bool:
        """True from `stop()` on: nothing more is claimed or taken over at commit."""
        return self._stopping.is_set()

    @property
    def owes_claim(self) -> bool:
        """True while more events may be due than were claimed (the last claim filled its batch,
        or a wake-up found no worker free); `take_slots` refuses hand-offs once it has lasted
        `handoff_yield_after_s`."""
        with self._lock:
            return self._owed_since is not None

    def start(self) -> None:
        with self._lock:
            self._started = True
        self._executor.start()
        self._round_threads.start()
        self._thread.start()

    def take_slots(self, count: int) -> Lease | None:
        """Reserve idle workers for `count` events about to be committed by this process, and the
        lease to write them under; None when too few workers are idle, or when events have waited
        for a claim longer than `handoff_yield_after_s` (otherwise every worker that frees up can
        go to a newer event handed over, and the waiting ones wait for the poll; stopping at once
        instead puts every order through claims after any burst, which costs more). The caller
        must `hand` the events once committed, or `return_slots` if they never are."""
        with self._lock:
            busy = self._in_flight + self._reserved
            owed = self._owed_since is not None and (
                time.monotonic() - self._owed_since >= self._settings.handoff_yield_after_s
            )
            if not self._started or self._stopping.is_set() or owed or busy + count > self._settings.workers:
                return None
            self._reserved += count
        return Lease(str(uuid.uuid4()), self._settings.lease_s, count)

    def return_slots(self, lease: Lease) -> None:
        """The events of `lease` were not committed: free the workers reserved for them (for a
        claim at once, if events may be waiting for one)."""
        with self._lock:
            self._reserved -= lease.count
            owed = self._owed_since is not None
        if owed:
            self._wake.set()

    def hand(
        self, lease: Lease, events: Sequence[ClaimedEvent], committed_at: datetime | None = None
    ) -> None:
        """Run events committed under `lease`. When the dispatcher has begun to stop, hand them
        back to the queue instead (a deferral), or leave them to their lease if even that fails.
        Their dispatch lag counts from `committed_at` (a claimed event's can only count from its
        creation, before its transaction, and so includes that transaction)."""
        # The lease was written in the commit that just returned; its start was later than now
        # minus the time a commit may take, which a tenth of the lease bounds well.
        leased_since = time.monotonic() - self._settings.lease_s / 10
        with self._lock:
            self._reserved -= lease.count
            stopping = self._stopping.is_set()
            if not stopping:
                self._in_flight += len(events)
                self.stats.claimed += len(events)
                for event in events:
                    self._enter(event, leased_since)
        if stopping:
            for event in events:
                try:
                    self._count(self._record(event, Defer(0.0, "dispatcher stopping")), event, 0.0)
                except Exception as error:
                    log.warning("event %d left to its lease at stop: %s", event.id, _describe(error))
            return
        now = self._clock()
        for event in events:
            since = committed_at or event.created_at
            self._submit(event, max((now - since).total_seconds(), 0.0))

    def wake(self) -> None:
        self._wake.set()

    def note_committed(self, aggregate_id: str) -> None:
        """An event of `aggregate_id` was committed in this process: if one of its earlier events
        is running here, claim again as soon as that one finishes (see the module docstring)."""
        with self._lock:
            if aggregate_id in self._running:
                self._followed.add(aggregate_id)

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
                lambda: self._in_flight == 0 and self._rounds == 0,
                timeout=max(deadline - time.monotonic(), 0.0),
            )
        self._round_threads.shutdown(wait=finished)
        self._executor.shutdown(wait=finished)
        if self._has_finished():
            try:
                self._claim_and_submit(0)  # marks the last finished events DONE
            except Exception as error:
                log.warning("could not mark finished events DONE (%s); they will run again", _describe(error))
        return finished

    def _run(self) -> None:
        """The dispatcher thread: starts the rounds wanted, then sleeps until woken (a commit, a
        notification, a finished handler or round that wants a claim) or the poll interval."""
        while not self._stopping.is_set():
            with self._lock:
                pause, self._pause = self._pause, 0.0
                sizes = [] if pause else self._rounds_to_start()
            for size in sizes:
                self._round_threads.submit(self._round, size)
            self._renew_due_leases()
            # After a failure, a wake-up (a commit here, a notification once the database is back)
            # ends the pause early, so sagas resume as soon as the database answers again.
            until_renewal = max(self._next_renewal - time.monotonic(), 0.01)
            self._wake.wait(min(pause or self._settings.poll_interval_s, until_renewal))
            with self._lock:
                self._wanted = max(self._wanted, 1)  # woken, or the poll: look

    def _rounds_to_start(self) -> list[int]:
        """The sizes of the rounds to start now, counted in flight (under the lock). A size is how
        many events the round may claim; 0 only marks finished events DONE."""
        sizes: list[int] = []
        workers = self._settings.workers
        limit = 1 if self._failures else _ROUNDS
        while self._wanted > 0 and self._rounds < limit:
            busy = self._in_flight + self._reserved
            room = (4 if self._full else 2) * workers - busy - self._claiming
            # Claim ahead only while a worker is idle: events claimed for workers all busy wait
            # in this process's queue (and no idle worker means no hand-off: at 200 orders/s a
            # queue kept three batches deep held events for hundreds of milliseconds), and for
            # workers stuck on slow handlers they would wait out their leases. A round claims
            # `workers` events at least: topping the queue up as each handler finished made a
            # claim statement for every event or two under load.
            if room < workers or busy >= workers:
                if self._rounds == 0:
                    # Woken with no worker free, it cannot look: a finished handler brings the
                    # dispatcher back (a claim is owed). A round in flight decides that itself.
                    self._owe_claim(True)
                    self._wanted = 0
                    if self._flush_due():
                        sizes.append(self._begin_round(0))
                break
            self._wanted -= 1
            sizes.append(self._begin_round(min(room, 2 * workers)))
        return sizes

    def _begin_round(self, size: int) -> int:
        """Count a round of `size` in flight (under the lock)."""
        self._rounds += 1
        self._claiming += size
        return size

    def _round(self, size: int) -> None:
        """On a round thread: the DONE marks and a claim of up to `size`; then whether more rounds
        are wanted at once (a full batch: more may be due; completed events: their orders' later
        events were not claimable in that statement, see OutboxStore.complete_and_claim)."""
        try:
            claimed, completed = self._claim_and_submit(size)
        except Exception as error:
            with self._lock:
                self._claiming -= size  # the round claimed nothing
                self._failures += 1
                cap = max(5 * self._settings.poll_interval_s, 5.0)
                self._pause = min(self._settings.poll_interval_s * 2**self._failures, cap)
                # Under the lock, so that the lines of rounds failing together come in order.
                log.warning(
                    "claiming outbox events failed (%s); next try in %.1fs", _describe(error), self._pause
                )
        else:
            with self._lock:
                self._failures = 0
                if size > 0:
                    self._full = claimed == size
                    self._owe_claim(self._full)
                if claimed and claimed == size:
                    self._wanted = max(self._wanted, _ROUNDS - (self._rounds - 1))
                elif completed:
                    self._wanted = max(self._wanted, 1)
        finally:
            with self._idle:
                self._rounds -= 1
                wake = self._wanted > 0 or self._pause > 0
                self._idle.notify_all()
            if wake:
                self._wake.set()

    def _renew_due_leases(self) -> None:
        """Every third of `lease_s`, extend the leases of the events held for longer than that, in
        one statement. One whose lease ran out (the process stalled) is not revived: if queued, it
        will not start; if running, it goes on and its writes are fenced."""
        now = time.monotonic()
        if now < self._next_renewal or self._faults.get("lease_renewal_off"):
            return
        interval = self._settings.lease_s / 3
        self._next_renewal = now + interval
        with self._lock:
            due = [event for event, until in self._held.values() if until - now < 2 * interval]
        if not due:
            return
        try:
            with self._uow(single_statement=True) as uow:
                renewed = uow.outbox.renew(due, timedelta(seconds=self._settings.lease_s), self._clock())
                uow.commit()
        except Exception as error:
            log.warning("renewing %d lease(s) failed: %s", len(due), _describe(error))
            return
        lost = [event for event in due if event.id not in renewed]
        with self._lock:
            self.stats.renewed += len(renewed)
            for event in due:
                if event.id in self._held:  # lost: run out at once, so a queued one is not started
                    until = now + self._settings.lease_s if event.id in renewed else 0.0
                    self._held[event.id] = (event, until)
        for event in lost:
            log.warning("event %d: its lease ran out or passed to another dispatcher while held", event.id)

    def _owe_claim(self, owed: bool) -> None:
        """Whether more events may be due than were claimed (under the lock)."""
        if not owed:
            self._owed_since = None
        elif self._owed_since is None:
            self._owed_since = time.monotonic()

    def _has_finished(self) -> bool:
        with self._lock:
            return bool(self._finished)

    def _flush_due(self) -> bool:
        """Finished events should be marked DONE now, without a claim (under the lock or not)."""
        waiting = len(self._finished)
        return waiting >= 2 * self._settings.workers or (waiting > 0 and self._in_flight == 0)

    def _claim_and_submit(self, free: int) -> tuple[int, int]:
        """One transaction: mark the finished events DONE, then claim up to `free` due ones. The
        number claimed, and the number marked DONE. A round counted `free` in `_claiming` until
        now (`_begin_round`); the events claimed count in flight instead."""
        now = self._clock()
        sent = time.monotonic()
        with self._lock:
            finished, self._finished = self._finished, []
        try:
            # One statement on PostgreSQL, its own transaction (see `UnitOfWork`): no COMMIT round
            # trip. Nobody waits on a round with a deadline, so one the network delays may commit
            # late: its DONE marks hold all the same, and events it leased to a dispatcher that
            # gave up on it run once their lease runs out.
            with self._uow(single_statement=True) as uow:
                lease = timedelta(seconds=self._settings.lease_s)
                done = [event for event, _ in finished]
                kept, events = uow.outbox.complete_and_claim(done, free, lease, now)
                uow.commit()
        except Exception:
            with self._lock:  # try again with the next claim; a lease that runs out meanwhile fences them
                self._finished[:0] = finished
            raise
        for event, seconds in finished:
            if event.id not in kept:
                log.warning("event %d: lease lost to another dispatcher; DONE not recorded", event.id)
            self._count("done" if event.id in kept else "fenced", event, seconds)
        with self._lock:
            self._claiming -= free
            self._in_flight += len(events)
            self.stats.claimed += len(events)
            for event in events:
                self._enter(event, sent)
        for event in events:
            self._submit(event, event.age_s)
        return len(events), len(kept)

    def _submit(self, event: ClaimedEvent, lag_s: float) -> None:
        """Run a leased event, already counted in flight, on the executor."""
        if self._on_claimed is not None:
            self._on_claimed(event, lag_s)
        # A fresh context per task: one context entered by two threads at once raises.
        context = contextvars.Context()
        try:
            self._executor.submit(context.run, self._handle, event)
        except RuntimeError:  # the pool shut down after a stop that gave up waiting
            log.warning("event %d left to its lease: the dispatcher has stopped", event.id)
            with self._idle:
                self._in_flight -= 1
                self._leave(event)
                self._idle.notify_all()

    def _handle(self, event: ClaimedEvent) -> None:
        correlation.set_current(event.correlation_id)
        correlation.set_order_id(event.aggregate_id)
        started = time.perf_counter()
        # The benchmark pairs this line with the PlaceOrder call of the same correlation id to
        # measure pickup latency (call start -> handler start).
        log.debug("handling %s event %d", event.event_type, event.id)
        try:
            if self._stopping.is_set():  # claimed ahead, never started: hand it back now
                self._count(self._record(event, Defer(0.0, "dispatcher stopping")), event, 0.0)
                return
            if self._lease_ran_out(event):
                log.warning("event %d: its lease ran out before it started; handed back", event.id)
                handed_back = self._record(event, Defer(0.0, "lease ran out before the step started"))
                self._count("expired" if handed_back == "deferred" else handed_back, event, 0.0)
                return
            if event.attempts > self._settings.max_attempts:
                self._count(self._bury_unrun(event), event, 0.0)
                return
            verdict = self._verdict(event)
            self._faults.maybe_delay("handler_delay_s")
            self._faults.maybe_crash("crash_before_complete")
            seconds = time.perf_counter() - started
            if isinstance(verdict, Done):
                with self._lock:  # the dispatcher thread marks it DONE with its next claim
                    self._finished.append((event, seconds))
            elif isinstance(verdict, Completed):
                self._count("done" if verdict.kept else "fenced", event, seconds)
            else:
                self._count(self._record(event, verdict), event, seconds)
        except Exception as error:
            # Recording failed (database gone?): the lease expires and the event runs again.
            log.warning("could not record the outcome of event %d: %s", event.id, _describe(error))
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
                self._leave(event)
                wake = (
                    self._owed_since is not None or self._flush_due() or event.aggregate_id in self._followed
                )
                self._followed.discard(event.aggregate_id)
            if wake:
                self._wake.set()

    def _lease_ran_out(self, event: ClaimedEvent) -> bool:
        with self._lock:
            held = self._held.get(event.id)
        return held is not None and time.monotonic() >= held[1]

    def _bury_unrun(self, event: ClaimedEvent) -> str:
        """DEAD without running: every attempt of `max_attempts` was claimed and none recorded an
        outcome (each killed or stalled its process). The claim's note of why stays the error."""
        with self._uow() as uow:
            kept = uow.outbox.bury(event, None, self._clock())
            uow.commit()
        if not kept:
            return "fenced"
        log.error(
            "event %d (%s) is DEAD: none of its %d attempts finished (their processes died or stalled)",
            event.id,
            event.event_type,
            event.attempts - 1,
        )
        return "dead"

    def _enter(self, event: ClaimedEvent, leased_since: float) -> None:
        """Count `event` as running (under the lock); its lease was taken after `leased_since`."""
        self._running[event.aggregate_id] = self._running.get(event.aggregate_id, 0) + 1
        self._held[event.id] = (event, leased_since + self._settings.lease_s)

    def _leave(self, event: ClaimedEvent) -> None:
        """`event` stopped running (under the lock)."""
        self._held.pop(event.id, None)
        left = self._running.get(event.aggregate_id, 1) - 1
        if left > 0:
            self._running[event.aggregate_id] = left
        else:
            self._running.pop(event.aggregate_id, None)

    def _verdict(self, event: ClaimedEvent) -> Verdict:
        handler = self._handlers.get(event.event_type)
        if handler is None:
            return Retry(f"no handler for event type {event.event_type!r}")
        try:
            return handler(event)
        except Exception as error:
            log.warning("handler of %s event %d failed: %s", event.event_type, event.id, _describe(error))
            return Retry(_describe(error))

    def _record(self, event: ClaimedEvent, verdict: Retry | Defer) -> str:
        """Write a retry, a deferral or DEAD, fenced; the outcome, or "fenced"."""
        now = self._clock()
        with self._uow() as uow:
            if isinstance(verdict, Defer):
                kept = uow.outbox.reschedule(event, verdict.delay_s, now, verdict.reason, False)
                outcome = "deferred"
            elif event.attempts >= self._settings.max_attempts:
                outcome, kept = "dead", uow.outbox.bury(event, verdict.error, now)
                log.error(
                    "event %d (%s) is DEAD after %d attempts: %s",
                    event.id,
                    event.event_type,
                    event.attempts,
                    verdict.error,
                )
            else:
                delay = backoff_s(event.attempts, self._settings.retry_base_s, self._settings.retry_max_s)
                outcome, kept = "retried", uow.outbox.reschedule(event, delay, now, verdict.error, True)
            uow.commit()
        if not kept:
            log.warning(
                "event %d: lease lost to another dispatcher; outcome %r not recorded", event.id, outcome
            )
            return "fenced"
        return outcome

    def _count(self, outcome: str, event: ClaimedEvent, seconds: float) -> None:
        with self._lock:
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        if self._listener is not None:
            self._listener(outcome, event, seconds)


class WorkerPool:
    """`workers` threads running tasks from one queue, in the order given; nothing comes back.

    What the dispatcher needs of an executor, and no more: `ThreadPoolExecutor.submit` builds a
    future, its condition and a work item for every task and wakes a thread through a semaphore,
    which the dispatcher never reads; on the dispatcher's thread that was a tenth of a drain's time
    (a profile with `py-spy --gil`). Here a task is one put on a `queue.SimpleQueue`.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._tasks: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{n}", daemon=True) for n in range(workers)
        ]
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    def start(self) -> None:
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
        for thread in self._threads:
            thread.start()

    def submit(self, task: Callable[..., object], *args: object) -> None:
        """Queue `task(*args)`; RuntimeError once the pool has shut down."""
        if self._closed:
            raise RuntimeError("the worker pool has shut down")
        self._tasks.put(partial(task, *args))

    def shutdown(self, wait: bool) -> None:
        """Drop the tasks not yet started and end the threads once their running tasks return
        (waited for when `wait`)."""
        with self._lock:
            self._closed = True
            started = self._started
        while True:
            try:
                self._tasks.get_nowait()
            except queue.Empty:
                break
        if not started:
            return
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            if self._closed:
                continue  # taken from the queue before the shutdown could drop it
            try:
                task()
            except Exception:  # a task's own errors are its business; the thread goes on
                log.exception("a task of the worker pool failed")


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:500]
