"""The outbox dispatcher: a thread that decides when to claim due events (`saga.rounds`), a
bounded pool of workers that run their handlers (`saga.worker_pool`, the bulkhead), and the leases
it holds meanwhile (`saga.leases`).

It knows event types and handlers, nothing of what an event means. Each handler runs with the
event's correlation id and order id restored in a fresh context (an executor carries no
contextvars), and its verdict (`saga.verdicts`) is written back fenced on the lease. DONE is
written in batches, with the next round's claim. An event this process commits while a worker is
idle is handed over without a claim (`take_slots`, `hand`). An event whose previous attempt
never finished (`ClaimedEvent.suspect`: it may have killed its process) runs alone, once nothing
else runs, with no claim or hand-off meanwhile: a crash loop then costs attempts of that event
only, not of the events that happened to run beside it. A handler may offer a batch entry point
for its event type (`BatchHandler`): a round's events of that type then run together on one
worker, suspects excepted. docs/architecture.md, "The dispatcher", tells the whole design and why.

Why one module of this size: one class whose state (events in flight, promised workers, rounds,
suspects) lives under one lock; the rules it applies are in the modules named above.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from db.engine import background_writer
from db.outbox import ClaimedEvent, Lease
from db.queue import QueueUowFactory
from domain import correlation
from domain.model import utcnow
from saga import rounds
from saga.leases import LeaseKeeper
from saga.signals import WakeUp
from saga.verdicts import (
    BatchHandler,
    Completed,
    Defer,
    Done,
    Handler,
    Retry,
    Verdict,
    backoff_s,
    describe,
)
from saga.worker_pool import WorkerPool

log = logging.getLogger("orders.dispatcher")


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
    # Names this dispatcher's threads (`<name>_N` workers, `<name>-dispatcher`): empty for the
    # saga's (`saga_N`, `dispatcher`), "relay" for the event relay's.
    name: str = ""


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
    batched: int = 0  # events a batch handler answered (saga.verdicts.BatchHandler)
    handed: int = 0  # events handed over at commit, without a claim (counted in `claimed` too)


Listener = Callable[[str, ClaimedEvent, float], None]  # (outcome, event, handler seconds)


class OutboxDispatcher:
    """Claims outbox events and runs their handlers; `start()` it once, `stop()` it once."""

    def __init__(
        self,
        uow: QueueUowFactory,
        handlers: Mapping[str, Handler],
        settings: DispatcherSettings,
        wake: WakeUp | None = None,
        clock: Callable[[], datetime] = utcnow,
        listener: Listener | None = None,
        renewal_paused: Callable[[], bool] = lambda: False,
        on_claimed: Callable[[ClaimedEvent, float], None] | None = None,
        batch_handlers: Mapping[str, BatchHandler] | None = None,
    ) -> None:
        """`batch_handlers`: for the event types that have one, the events of a type claimed in
        one round run together on one worker (suspects excepted: they run alone)."""
        self._uow = uow
        self._handlers = dict(handlers)
        self._batch_handlers = dict(batch_handlers or {})
        self._settings = settings
        self._wake = wake or WakeUp()
        self._clock = clock
        self._listener = listener
        self._on_claimed = on_claimed
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified whenever a handler finishes
        self._in_flight = 0
        # Events held in batches beyond the first of each: a batch takes one worker (`_busy`).
        self._batched = 0
        self._reserved = 0  # workers promised to events being committed (`take_slots`)
        # Since when (monotonic) a claim is owed: the last claim filled its batch, or a wake-up
        # found no worker free, so more events may be due than were claimed; None when not.
        self._owed_since: float | None = None
        self._running: dict[str, int] = {}  # aggregates of the events in flight, with counts
        self._leases = LeaseKeeper(uow, settings.lease_s, clock, renewal_paused)
        self._followed: set[str] = set()  # running aggregates with a later event committed here
        self._started = False
        # Handled events waiting to be marked DONE, with their handler seconds (under the lock).
        self._finished: list[tuple[ClaimedEvent, float]] = []
        self._rounds = 0  # rounds in flight
        self._claiming = 0  # events the rounds in flight may claim
        self._wanted = 1  # rounds to start (one at start-up, for what was committed before)
        self._full = False  # the last round claimed all it asked for: more may be due
        self._failures = 0  # rounds failed in a row
        # Events done in a row: none deferred, retried, fenced or expired since (`saga.rounds`).
        self._settled = 0
        self._pause = 0.0  # seconds to wait before the next round, after a failure
        # Suspect events waiting to run alone, with their dispatch lag; and whether one runs.
        self._solo: collections.deque[tuple[ClaimedEvent, float]] = collections.deque()
        self._solo_running = False
        self._stopping = threading.Event()
        prefix = f"{settings.name}-" if settings.name else ""
        # The handlers' and the rounds' writes finish what earlier commits started: on SQLite they
        # pass the writer gate before the calls' (db.engine.WriterGate).
        self._executor = WorkerPool(settings.workers, settings.name or "saga", on_start=background_writer)
        self._round_threads = WorkerPool(
            rounds.ROUNDS, f"{prefix}dispatcher-round", on_start=background_writer
        )
        self._thread = threading.Thread(target=self._run, name=f"{prefix}dispatcher", daemon=True)
        self.stats = DispatcherStats()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def renewed_leases(self) -> int:
        """Leases extended so far while their events were held here."""
        return self._leases.renewed

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
            busy = self._busy()
            owed = self._owed_since is not None and (
                time.monotonic() - self._owed_since >= self._settings.handoff_yield_after_s
            )
            closed = not self._started or self._stopping.is_set() or bool(self._solo) or self._solo_running
            if closed or owed or busy + count > self._settings.workers:
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
                self.stats.handed += len(events)
                for event in events:
                    self._enter(event, leased_since)
        if stopping:
            for event in events:
                self._hand_back_at_stop(event)
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
        self._hand_back_solo()
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
                log.warning("could not mark finished events DONE (%s); they will run again", describe(error))
        stats = self.stats
        log.info(
            "dispatcher stopped: %d events taken (%d handed over at commit, %d in batches), %d done",
            stats.claimed,
            stats.handed,
            stats.batched,
            stats.done,
        )
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
            self._leases.renew_due()
            # After a failure, a wake-up (a commit here, a notification once the database is back)
            # ends the pause early, so sagas resume as soon as the database answers again.
            timeout = min(pause or self._settings.poll_interval_s, self._leases.seconds_to_renewal())
            self._wake.wait(timeout)
            with self._lock:
                self._wanted = max(self._wanted, 1)  # woken, or the poll: look

    def _rounds_to_start(self) -> list[int]:
        """The sizes of the rounds to start now (`saga.rounds.plan_rounds`), counted in flight
        (under the lock)."""
        solo = bool(self._solo) or self._solo_running  # nothing more while a suspect waits or runs
        plan = rounds.plan_rounds(
            rounds.Load(
                workers=self._settings.workers,
                busy=self._settings.workers if solo else self._busy(),
                held=self._in_flight + self._reserved,
                claiming=self._claiming,
                rounds=self._rounds,
                wanted=self._wanted,
                full=self._full,
                failing=self._failures > 0,
                finished=len(self._finished),
                in_flight=self._in_flight,
                settled=self._settled,
            )
        )
        self._wanted = plan.wanted
        if plan.owe_claim:
            self._owe_claim(True)
        self._rounds += len(plan.sizes)
        self._claiming += sum(plan.sizes)
        return list(plan.sizes)

    def _busy(self) -> int:
        """Workers taken: events running or queued, a batch counting once, and hand-offs promised
        (under the lock). A batch that counted every event would keep idle workers from the
        hand-offs that come in while it runs, and send those events through claims and batches too."""
        return self._in_flight - self._batched + self._reserved

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
                self._pause = rounds.pause_after_failures(self._failures, self._settings.poll_interval_s)
                # Under the lock, so that the lines of rounds failing together come in order.
                log.warning(
                    "claiming outbox events failed (%s); next try in %.1fs", describe(error), self._pause
                )
        else:
            with self._lock:
                self._failures = 0
                if size > 0:
                    self._full = claimed == size
                    self._owe_claim(self._full)
                left = self._rounds - 1
                self._wanted = rounds.wanted_after_round(size, claimed, completed, self._wanted, left)
        finally:
            with self._idle:
                self._rounds -= 1
                wake = self._wanted > 0 or self._pause > 0
                self._idle.notify_all()
            if wake:
                self._wake.set()

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
        """Finished events should be marked DONE now, without a claim (under the lock)."""
        return rounds.flush_due(len(self._finished), self._settings.workers, self._in_flight)

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
        alone, batches = self._batches_of(events)
        with self._lock:
            self._claiming -= free
            self._in_flight += len(events)
            self._batched += sum(len(batch) - 1 for batch in batches)
            self.stats.claimed += len(events)
            for event in events:
                self._enter(event, sent)
        for event in alone:
            self._submit(event, event.age_s)
        for batch in batches:
            self._run_on_pool(batch, [event.age_s for event in batch])
        return len(events), len(kept)

    def _batches_of(
        self, events: Sequence[ClaimedEvent]
    ) -> tuple[list[ClaimedEvent], list[list[ClaimedEvent]]]:
        """A round's events as those that run alone (suspects, types without a batch handler, the
        only one of its type) and the batches, one per type with a batch handler."""
        alone: list[ClaimedEvent] = []
        by_type: dict[str, list[ClaimedEvent]] = {}
        for event in events:
            if event.suspect or event.event_type not in self._batch_handlers:
                alone.append(event)
            else:
                by_type.setdefault(event.event_type, []).append(event)
        batches = [batch for batch in by_type.values() if len(batch) > 1]
        alone += [batch[0] for batch in by_type.values() if len(batch) == 1]
        return alone, batches

    def _submit(self, event: ClaimedEvent, lag_s: float) -> None:
        """Run a leased event, already counted in flight, on the executor (a suspect: alone)."""
        if event.suspect:
            with self._lock:
                busy = bool(self._solo) or self._solo_running
                if not busy:
                    self._solo.append((event, lag_s))
            if busy:
                self._hand_back_suspect(event)
                return
            unfinished = event.attempts - 1
            log.warning("event %d: attempt %d did not finish; this one runs alone", event.id, unfinished)
            self._start_solo()
            return
        self._run_on_pool([event], [lag_s])

    def _hand_back_suspect(self, event: ClaimedEvent) -> None:
        """One suspect at a time per process: another claimed beside it goes back unrun, its
        attempt given back and its error kept (so it is still a suspect when claimed again); held
        here, it would die with the first if that one kills the process."""
        try:
            with self._uow() as uow:
                later_s = self._settings.poll_interval_s
                kept = uow.outbox.reschedule(event, later_s, self._clock(), None, False)
                uow.commit()
            self._count("deferred" if kept else "fenced", event, 0.0)
        except Exception as error:
            log.warning("event %d left to its lease: %s", event.id, describe(error))
        with self._idle:
            self._in_flight -= 1
            self._leave(event)
            self._idle.notify_all()
        self._start_solo()

    def _run_on_pool(self, events: Sequence[ClaimedEvent], lags_s: Sequence[float]) -> None:
        """One task on the pool: an event, or a batch of one type (`_handle_batch`)."""
        if self._on_claimed is not None:
            for event, lag_s in zip(events, lags_s, strict=True):
                self._on_claimed(event, lag_s)
        # A fresh context per task: one context entered by two threads at once raises.
        context = contextvars.Context()
        try:
            if len(events) == 1:
                self._executor.submit(context.run, self._handle, events[0])
            else:
                self._executor.submit(context.run, self._handle_batch, events)
        except RuntimeError:  # the pool shut down after a stop that gave up waiting
            with self._idle:
                self._batched -= len(events) - 1
                for event in events:
                    log.warning("event %d left to its lease: the dispatcher has stopped", event.id)
                    self._in_flight -= 1
                    self._leave(event)
                    self._solo_running = self._solo_running and not event.suspect
                self._idle.notify_all()

    def _start_solo(self) -> None:
        """Start the next suspect event once nothing else is in flight (queued suspects aside)."""
        with self._lock:
            if self._solo_running or not self._solo or self._in_flight != len(self._solo):
                return
            event, lag_s = self._solo.popleft()
            self._solo_running = True
        self._run_on_pool([event], [lag_s])

    def _hand_back_solo(self) -> None:
        """At stop: the suspects still waiting go back to the queue (a deferral), unrun."""
        with self._lock:
            waiting, self._solo = list(self._solo), collections.deque()
        for event, _lag in waiting:
            self._hand_back_at_stop(event)
            with self._idle:
                self._in_flight -= 1
                self._leave(event)
                self._idle.notify_all()

    def _hand_back_at_stop(self, event: ClaimedEvent) -> None:
        """Give an unrun event back to the queue at stop (a deferral), or leave it to its lease."""
        try:
            self._count(self._record(event, Defer(0.0, "dispatcher stopping")), event, 0.0)
        except Exception as error:
            log.warning("event %d left to its lease at stop: %s", event.id, describe(error))

    def _handle(self, event: ClaimedEvent) -> None:
        correlation.set_current(event.correlation_id)
        correlation.set_order_id(event.aggregate_id)
        started = time.perf_counter()
        try:
            if self._runnable(event):
                verdict = self._verdict(event)
                self._write_back(event, verdict, time.perf_counter() - started)
        finally:
            self._finish([event])

    def _handle_batch(self, events: Sequence[ClaimedEvent]) -> None:
        """Events of one type together: one call of the type's batch handler for those that may
        run, then each verdict written back as `_handle` writes one; the events the batch handler
        leaves out run one by one after it, through the type's handler."""
        started = time.perf_counter()
        try:
            runnable = []
            for event in events:
                with correlation.bound(event.correlation_id, event.aggregate_id):
                    if self._runnable(event):
                        runnable.append(event)
            verdicts = self._batch_verdicts(runnable)
            seconds = time.perf_counter() - started
            with self._lock:
                self.stats.batched += len(verdicts)
            for event in runnable:
                with correlation.bound(event.correlation_id, event.aggregate_id):
                    verdict = verdicts.get(event.id)
                    if verdict is None:
                        alone = time.perf_counter()
                        verdict, seconds = self._verdict(event), time.perf_counter() - alone
                    self._write_back(event, verdict, seconds)
        finally:
            self._finish(events)

    def _batch_verdicts(self, events: Sequence[ClaimedEvent]) -> Mapping[int, Verdict]:
        """The batch handler's verdicts by event id (a batch of one, or less, runs alone); all
        Retry if it raises."""
        if len(events) < 2:
            return {}
        event_type = events[0].event_type
        try:
            return self._batch_handlers[event_type](events)
        except Exception as error:
            log.warning("batch handler of %d %s events failed: %s", len(events), event_type, describe(error))
            return {event.id: Retry(describe(error)) for event in events}

    def _runnable(self, event: ClaimedEvent) -> bool:
        """Whether a leased event may run now; if not, it is handed back (stopping, or its lease
        ran out in the queue) or buried (out of attempts) here."""
        # The benchmark pairs this line with the PlaceOrder call of the same correlation id to
        # measure pickup latency (call start -> handler start).
        log.debug("handling %s event %d", event.event_type, event.id)
        try:
            if self._stopping.is_set():  # claimed ahead, never started: hand it back now
                self._count(self._record(event, Defer(0.0, "dispatcher stopping")), event, 0.0)
                return False
            if self._leases.ran_out(event):
                log.warning("event %d: its lease ran out before it started; handed back", event.id)
                handed_back = self._record(event, Defer(0.0, "lease ran out before the step started"))
                self._count("expired" if handed_back == "deferred" else handed_back, event, 0.0)
                return False
            if event.attempts > self._settings.max_attempts:
                self._count(self._bury_unrun(event), event, 0.0)
                return False
        except Exception as error:
            self._not_recorded(event, error)
            return False
        return True

    def _write_back(self, event: ClaimedEvent, verdict: Verdict, seconds: float) -> None:
        """Record a handler's verdict, fenced on the lease (DONE with the next round)."""
        try:
            if isinstance(verdict, Done):
                with self._lock:  # the dispatcher thread marks it DONE with its next claim
                    self._finished.append((event, seconds))
            elif isinstance(verdict, Completed):
                self._count("done" if verdict.kept else "fenced", event, seconds)
            else:
                self._count(self._record(event, verdict), event, seconds)
        except Exception as error:
            self._not_recorded(event, error)

    @staticmethod
    def _not_recorded(event: ClaimedEvent, error: Exception) -> None:
        # Recording failed (database gone?): the lease expires and the event runs again.
        log.warning("could not record the outcome of event %d: %s", event.id, describe(error))

    def _finish(self, events: Sequence[ClaimedEvent]) -> None:
        """`events` stopped running: free their workers' count, and wake the dispatcher when that
        can find work (see the module docstring)."""
        with self._idle:
            self._in_flight -= len(events)
            self._batched -= len(events) - 1
            self._idle.notify_all()
            followed = False
            for event in events:
                self._leave(event)
                if event.suspect:
                    self._solo_running = False
                followed = followed or event.aggregate_id in self._followed
                self._followed.discard(event.aggregate_id)
            wake = self._owed_since is not None or self._flush_due() or followed
        self._start_solo()
        if wake:
            self._wake.set()

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
        self._leases.hold(event, leased_since)

    def _leave(self, event: ClaimedEvent) -> None:
        """`event` stopped running (under the lock)."""
        self._leases.release(event)
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
            log.warning("handler of %s event %d failed: %s", event.event_type, event.id, describe(error))
            return Retry(describe(error))

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
            self._settled = self._settled + 1 if outcome == "done" else 0
        if self._listener is not None:
            self._listener(outcome, event, seconds)
