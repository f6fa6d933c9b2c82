"""The inventory saga: ORDER_CREATED reserves stock and settles the order; ORDER_CANCELLED releases.

Steps of ORDER_CREATED, each idempotent so that at-least-once delivery has exactly-once effects:

1. Reserve the event's items, all or none, in the inventory's own transaction
   (`InventoryParticipant`), through the rate limiter and the circuit breaker. Reservations are
   keyed by order id: a redelivery finds them and reserves nothing more.
2. Settle the order and mark the event DONE in one orders transaction, fenced on the lease: the
   order moves from PENDING to VALIDATED when reserved, to FAILED with the reason when not (the
   compensating transaction; the order was closed in the inventory first, nothing is held).
3. If the order was no longer PENDING (cancelled meanwhile, settled by an earlier delivery), read
   it and release what it holds unless it is VALIDATED.

Every write is fenced, so a step that outlived its lease changes nothing once another step has
taken over: in the orders database on the lease token (settle and DONE commit together, only
while the token is this step's), in the inventory on the lease's `Fence` (the event and claim
number), which every inventory transaction records first and refuses if a newer step of the
order wrote (`Superseded`). Giving up closes the order in the inventory before failing it, like a
rejection: a stale step that gives up releases nothing of the step that took over.

The happy path reads no order: the event carries the items, and the settle is a compare-and-set
on the status. Two transactions per order, one in each database, and on PostgreSQL one statement
in each (`StockRepository.reserve`, `OrdersUnitOfWork.settle_and_complete`): each execution is
the larger part of a step's CPU (docs/performance.md, "Where the time goes").

A dispatcher round's ORDER_CREATED events run together (`on_orders_created`): one inventory
transaction reserves for the whole batch, each order all or none in event order, and one orders
transaction settles them all, each event fenced on its own lease and answered with the verdict it
would get alone.

An open breaker or a denied rate limit defers the event without using an attempt; transient
errors retry; past `max_attempts` or `saga_timeout_s` the order is FAILED ("inventory
unavailable") and anything reserved is released. A malformed event raises and ends DEAD.

Why one module of this size: the saga steps, their compensation and fencing read as one story,
for one order or a batch (which falls back on the one-order steps for what it cannot batch); the
participant beside them is the inventory side of the same steps.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

import pybreaker

from db.inventory import InventoryUnitOfWork
from db.outbox import ClaimedEvent
from db.unit_of_work import OrdersUnitOfWork
from domain import correlation
from domain.allocation import ReservationRequest
from domain.errors import ConflictError
from domain.events import OrderCancelled, OrderExpired, OrderPlaced
from domain.fencing import Fence
from domain.inventory import Rejected, ReservationOutcome, Reserved, Superseded
from domain.model import Order, OrderItem, OrderStatus, Settlement, utcnow
from saga.resilience import BreakerOpenError, Guard, RateLimitedError
from saga.verdicts import BatchHandler, Completed, Defer, Done, Handler, Retry, Verdict, describe

log = logging.getLogger("orders.saga")

INVENTORY_UNAVAILABLE = "inventory unavailable"

T = TypeVar("T")


class MalformedEventError(Exception):
    """The event cannot be understood; retrying will not help, so it ends DEAD."""


def _payload(raw: str) -> dict[str, object]:
    try:
        payload = json.loads(raw)
        order_id = payload["order_id"]
    except (ValueError, TypeError, KeyError) as error:
        raise MalformedEventError(f"payload is not an order event: {error}") from error
    if not isinstance(order_id, str) or not order_id:
        raise MalformedEventError("payload has no order_id")
    return dict(payload)


def parse_order_id(raw: str) -> str:
    return str(_payload(raw)["order_id"])


def parse_placed(raw: str) -> tuple[str, tuple[OrderItem, ...]]:
    """The order id and items of an ORDER_CREATED payload (see domain.events.OrderPlaced)."""
    payload = _payload(raw)
    listed = payload.get("items")
    if not isinstance(listed, list) or not listed:
        raise MalformedEventError("payload has no items")
    try:
        items = tuple(OrderItem(str(i["sku"]), int(i["quantity"])) for i in listed)
    except (TypeError, KeyError, ValueError) as error:
        raise MalformedEventError(f"payload has malformed items: {error}") from error
    return str(payload["order_id"]), items


@dataclass(frozen=True)
class SagaSettings:
    max_attempts: int = 8
    saga_timeout_s: float = 600.0
    conflict_attempts: int = 5


class Participant(Protocol):
    """What the saga needs of the inventory (`InventoryParticipant`, or a wrapper of it)."""

    def reserve(
        self, order_id: str, items: tuple[OrderItem, ...], fence: Fence | None = None
    ) -> ReservationOutcome:
        """All items or none; with a `fence`, a Rejected order is closed in the inventory already."""
        ...

    def release(
        self, order_id: str, items: tuple[OrderItem, ...] = (), fence: Fence | None = None, reason: str = ""
    ) -> list[OrderItem] | Superseded: ...

    def reserve_many(self, requests: Sequence[ReservationRequest]) -> dict[str, ReservationOutcome]: ...


class InventoryParticipant:
    """The inventory side: every call is one transaction on the inventory engine, retried a few
    times with jitter when it loses a race (deadlock, serialization failure, duplicate key)."""

    def __init__(
        self,
        uow: Callable[[], InventoryUnitOfWork],
        conflict_attempts: int = 5,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._uow = uow
        self._conflict_attempts = conflict_attempts
        self._clock = clock
        self.conflict_retries = 0

    def reserve(
        self, order_id: str, items: tuple[OrderItem, ...], fence: Fence | None = None
    ) -> ReservationOutcome:
        """Reserve all items or none; with a `fence`, Superseded if a newer step of the order wrote,
        and a refused order (Rejected) closed in the inventory in the same transaction, as
        `release` with the reason would close it (see `StockRepository.reserve`)."""
        tries = itertools.count()

        def attempt() -> ReservationOutcome:
            # The first try skips the up-front read of earlier reservations (see StockRepository).
            check_first = next(tries) > 0
            with self._uow() as uow:
                now = self._clock()
                outcome = uow.stock.reserve(order_id, items, now, check_first=check_first, fence=fence)
                if isinstance(outcome, Reserved) or (fence is not None and isinstance(outcome, Rejected)):
                    uow.commit()  # a reservation, a redelivery's fence, or a fenced refusal's close
                return outcome  # otherwise leaving the block rolls back what was taken

        return self._with_conflict_retries(attempt)

    def reserve_many(self, requests: Sequence[ReservationRequest]) -> dict[str, ReservationOutcome]:
        """Reserve for a batch of orders in one transaction (`StockRepository.reserve_many`): an
        outcome per order, a refused one already closed in the inventory. The first try skips the
        read of earlier reservations unless an order's step is a redelivery (a claim after the
        first); a key conflict then sends the batch down the checked path."""
        tries = itertools.count()
        redelivered = any(request.fence.claim > 1 for request in requests)

        def attempt() -> dict[str, ReservationOutcome]:
            check_first = next(tries) > 0 or redelivered
            with self._uow() as uow:
                outcomes = uow.stock.reserve_many(requests, self._clock(), check_first=check_first)
                uow.commit()
            return outcomes

        return self._with_conflict_retries(attempt)

    def release(
        self, order_id: str, items: tuple[OrderItem, ...] = (), fence: Fence | None = None, reason: str = ""
    ) -> list[OrderItem] | Superseded:
        """Release what the order holds and close it to later reservations, for `reason` (see
        StockRepository); with a `fence`, Superseded if a newer step of the order wrote."""

        def attempt() -> list[OrderItem] | Superseded:
            with self._uow() as uow:
                released = uow.stock.release(order_id, self._clock(), items, fence, reason)
                if not isinstance(released, Superseded):
                    uow.commit()
            return released

        return self._with_conflict_retries(attempt)

    def _with_conflict_retries(self, work: Callable[[], T]) -> T:
        for attempt in range(self._conflict_attempts):
            try:
                return work()
            except ConflictError:
                if attempt + 1 == self._conflict_attempts:
                    raise
                self.conflict_retries += 1
                time.sleep(random.uniform(0, 0.002 * 2**attempt))
        raise AssertionError("unreachable")


class InventorySaga:
    """The handlers of ORDER_CREATED, and of ORDER_CANCELLED and ORDER_EXPIRED (release)."""

    def __init__(
        self,
        orders_uow: Callable[..., OrdersUnitOfWork],
        participant: Participant,
        guard: Guard,
        settings: SagaSettings,
        on_order_settled: Callable[[str, Settlement, datetime], None] = lambda _order_id, _how, _at: None,
        clock: Callable[[], datetime] = utcnow,
        on_outcome: Callable[[str], None] = lambda _outcome: None,
        batching: bool = False,
    ) -> None:
        """`batching`: offer the set-based ORDER_CREATED (`batch_handlers`), as the server does on
        every backend; without it every order runs alone (`on_order_created`)."""
        self._batching = batching
        self._on_outcome = on_outcome
        self._orders_uow = orders_uow
        self._participant = participant
        self._guard = guard
        self._settings = settings
        self._on_order_settled = on_order_settled
        self._clock = clock

    def handlers(self) -> dict[str, Handler]:
        return {
            OrderPlaced.event_type: self.on_order_created,
            OrderCancelled.event_type: self.on_order_cancelled,
            OrderExpired.event_type: self.on_order_cancelled,  # the same compensation: release
        }

    def batch_handlers(self) -> dict[str, BatchHandler]:
        """The handlers that take a dispatcher round's events of one type together."""
        return {OrderPlaced.event_type: self.on_orders_created} if self._batching else {}

    def on_orders_created(self, events: Sequence[ClaimedEvent]) -> dict[int, Verdict]:
        """ORDER_CREATED, set-based: one inventory transaction reserves for the whole batch (each
        order all or none, in event order, `StockRepository.reserve_many`), one orders transaction
        settles every order and completes its event, each fenced on its own lease token; the
        verdict of each event, by id, is the one `on_order_created` would give it alone.

        Through the guard as one call: the breaker counts one call, the limiter a permit per order;
        with fewer permits left than orders, the first orders run and the rest are deferred (no
        attempt spent). An event this leaves out (malformed, past the saga's timeout, a batch of
        one) the dispatcher runs alone through `on_order_created`.

        On PostgreSQL the batch's statements take array parameters and write through
        data-modifying WITH: what they save is round trips and statement executions. On SQLite (see
        `StockRepository.reserve_many`) the same steps take a statement per order, and what the
        batch saves is two write transactions per order, each a pass of the writer gate that
        PlaceOrder waits on too, a BEGIN IMMEDIATE and a COMMIT. The saving per order, in one
        thread and at the server: docs/performance.md, "Seventh round" and "Eighth round"."""
        batch: list[tuple[ClaimedEvent, ReservationRequest]] = []
        for event in events:
            try:
                order_id, items = parse_placed(event.payload)
            except MalformedEventError:
                continue
            if event.age_s <= self._settings.saga_timeout_s:
                batch.append((event, ReservationRequest(order_id, items, event.fence)))
        if len({request.order_id for _, request in batch}) != len(batch) or len(batch) < 2:
            return {}  # an order twice (no claim makes that) or a batch of one: one by one
        return self._reserve_batch(batch)

    def _reserve_batch(self, batch: Sequence[tuple[ClaimedEvent, ReservationRequest]]) -> dict[int, Verdict]:
        requests = [request for _, request in batch]

        def reserve(granted: int) -> dict[str, ReservationOutcome]:
            return self._participant.reserve_many(requests[:granted])

        outcomes = self._guarded_for(len(requests), reserve)
        if isinstance(outcomes, Defer):
            return {event.id: outcomes for event, _ in batch}
        if isinstance(outcomes, Exception):
            return {event.id: self._reserve_failed(request, event, outcomes) for event, request in batch}
        verdicts: dict[int, Verdict] = {}
        settling: list[tuple[Settlement, ClaimedEvent]] = []
        for event, request in batch:
            outcome = outcomes.get(request.order_id)
            with correlation.bound(event.correlation_id, request.order_id):
                if outcome is None:  # no rate permit left for it
                    verdicts[event.id] = self._defer(RateLimitedError("rate limited"))
                elif isinstance(outcome, Superseded):
                    verdicts[event.id] = self._superseded(request.order_id, event)
                elif isinstance(outcome, Reserved):
                    log.info("stock reserved for order %s", request.order_id)
                    settling.append((Settlement.validated(), event))
                else:  # closed in the inventory in the same transaction, as `_release` would
                    log.info("order %s cannot be reserved: %s", request.order_id, outcome.reason)
                    settling.append((Settlement.failed(outcome.reason), event))
        if settling:
            items = {event.id: request.items for event, request in batch}
            verdicts.update(self._settle_batch(settling, items))
        return verdicts

    def _settle_batch(
        self, settling: Sequence[tuple[Settlement, ClaimedEvent]], items: dict[int, tuple[OrderItem, ...]]
    ) -> dict[int, Verdict]:
        """Settle the orders of `settling` and complete their events, one commit
        (`OrdersUnitOfWork.settle_and_complete_many`); then, per event, as `_settle` goes on."""
        now = self._clock()
        try:
            with self._orders_uow() as uow:
                answers = uow.settle_and_complete_many(settling, now)
                uow.commit()
        except Exception as error:  # the reservations stand: a redelivery finds them and settles
            log.warning("settling %d orders failed: %s", len(settling), describe(error))
            return {event.id: Retry(describe(error)) for _, event in settling}
        verdicts: dict[int, Verdict] = {}
        for settlement, event in settling:
            leased, settled = answers[event.id]
            order_id = event.aggregate_id
            with correlation.bound(event.correlation_id, order_id):
                if not leased:
                    verdicts[event.id] = self._superseded(order_id, event)
                elif not settled:
                    verdicts[event.id] = self._after_settle_refused(order_id, items[event.id], event)
                else:
                    verdicts[event.id] = self._settled(order_id, settlement, now)
        return verdicts

    def _reserve_failed(self, request: ReservationRequest, event: ClaimedEvent, error: Exception) -> Verdict:
        """The verdict of a step whose reservation failed with `error` (not an outage)."""
        with correlation.bound(event.correlation_id, request.order_id):
            if event.attempts >= self._settings.max_attempts:
                return self._give_up(request.order_id, request.items, event, str(error))
        return Retry(f"reserve failed: {type(error).__name__}: {error}")

    def on_order_created(self, event: ClaimedEvent) -> Verdict:
        order_id, items = parse_placed(event.payload)
        if event.age_s > self._settings.saga_timeout_s:
            return self._give_up(order_id, items, event, "saga timed out")
        outcome = self._guarded(self._participant.reserve, order_id, items, event.fence)
        if isinstance(outcome, Defer):
            return outcome
        if isinstance(outcome, Exception):
            return self._reserve_failed(ReservationRequest(order_id, items, event.fence), event, outcome)
        if isinstance(outcome, Superseded):
            return self._superseded(order_id, event)
        if isinstance(outcome, Reserved):
            log.info("stock reserved for order %s", order_id)
            return self._settle(order_id, items, event, Settlement.validated())
        log.info("order %s cannot be reserved: %s", order_id, outcome.reason)
        # The fenced refusal closed the order in the inventory (the participant's `reserve`) before
        # it is failed here, so that no step of this saga still running elsewhere (a lost lease)
        # can reserve for an order that is already FAILED.
        return self._settle(order_id, items, event, Settlement.failed(outcome.reason))

    def on_order_cancelled(self, event: ClaimedEvent) -> Verdict:
        order_id = parse_order_id(event.payload)
        order = self._load(order_id)
        if order is None:
            raise MalformedEventError(f"order {order_id} does not exist")
        return self._release(order_id, order.items, event)

    def _load(self, order_id: str) -> Order | None:
        with self._orders_uow(write=False) as uow:
            return uow.orders.get(order_id)

    def _settle(
        self,
        order_id: str,
        items: tuple[OrderItem, ...],
        event: ClaimedEvent,
        settlement: Settlement,
        outcome: str = "",
    ) -> Verdict:
        """PENDING -> as `settlement` says, and the event DONE, one commit; nothing at all if the
        lease is gone."""
        now = self._clock()
        with self._orders_uow() as uow:
            settled, completed = uow.settle_and_complete(order_id, settlement, event, now)
            if settled:
                if not completed:
                    return self._superseded(order_id, event)  # leaving the block rolls the settle back
                uow.commit()
        if not settled:
            return self._after_settle_refused(order_id, items, event)
        return self._settled(order_id, settlement, now, outcome)

    def _settled(self, order_id: str, settlement: Settlement, at: datetime, outcome: str = "") -> Completed:
        """The order was settled as `settlement` says (at `at`, its update time) and its event
        completed: tell who listens."""
        self._on_order_settled(order_id, settlement, at)
        self._on_outcome(outcome or settlement.status.value.lower())
        reason = settlement.reason
        log.info("order %s is %s%s", order_id, settlement.status.value, f": {reason}" if reason else "")
        return Completed()

    def _after_settle_refused(
        self, order_id: str, items: tuple[OrderItem, ...], event: ClaimedEvent
    ) -> Verdict:
        """The order was not PENDING: read it and make sure nothing stays reserved unless it is
        VALIDATED (fenced: a step that lost its lease releases nothing of the one that took over)."""
        order = self._load(order_id)
        if order is None:
            self._release(order_id, items, event)  # what this step may have reserved
            raise MalformedEventError(f"order {order_id} does not exist")
        log.info("order %s is %s, not PENDING, for the saga", order_id, order.status.value)
        if order.status is OrderStatus.VALIDATED:
            return Done()
        if order.status is OrderStatus.PENDING:
            return Retry("order changed concurrently and is still PENDING")
        return self._release(order_id, order.items, event)

    def _give_up(self, order_id: str, items: tuple[OrderItem, ...], event: ClaimedEvent, why: str) -> Verdict:
        """FAILED ("inventory unavailable") after the last attempt or past the saga's timeout. The
        order is closed in the inventory first, as for a rejection: then no step of this saga can
        reserve for it any more, and if the inventory is still down the event comes back (a
        deferral, not an attempt) rather than failing an order whose stock may be held."""
        log.warning("giving up on order %s after %d attempts: %s", order_id, event.attempts, why)
        try:
            closed = self._participant.release(order_id, items, event.fence, INVENTORY_UNAVAILABLE)
        except Exception as error:
            return self._defer(error)
        if isinstance(closed, Superseded):
            return self._superseded(order_id, event)
        return self._settle(order_id, items, event, Settlement.failed(INVENTORY_UNAVAILABLE), "gave_up")

    def _guarded(self, call: Callable[..., T], *args: Any) -> T | Defer | Exception:
        """`call(*args)` through the limiter and the breaker (see `_guarded_for`)."""
        return self._guarded_for(1, lambda _granted: call(*args))

    def _guarded_for(self, orders: int, call: Callable[[int], T]) -> T | Defer | Exception:
        """`call(granted)` through the limiter (a permit for each of up to `orders` orders, `granted`
        of them taken) and the breaker (one call): its result; a deferral when the guard refuses or
        the failure found the breaker open (an outage: this call tripped it, or a probe failed),
        which costs no attempt; else the error, for the step to decide."""
        try:
            return self._guard.call_for(orders, call)
        except (BreakerOpenError, RateLimitedError) as error:
            return self._defer(error)
        except Exception as error:
            return self._defer(error) if self._breaker_open() else error

    def _release(
        self, order_id: str, items: tuple[OrderItem, ...], event: ClaimedEvent, reason: str = ""
    ) -> Verdict:
        released = self._guarded(self._participant.release, order_id, items, event.fence, reason)
        if isinstance(released, Defer):
            return released
        if isinstance(released, Exception):
            return Retry(f"release failed: {type(released).__name__}: {released}")
        if isinstance(released, Superseded):
            return self._superseded(order_id, event)
        if released:
            log.info("released %d reserved item(s) of order %s", len(released), order_id)
            self._on_outcome("released")
        return Done()

    @staticmethod
    def _superseded(order_id: str, event: ClaimedEvent) -> Completed:
        log.warning(
            "order %s: event %d's lease (claim %d) passed to another step; this one wrote nothing",
            order_id,
            event.id,
            event.claims,
        )
        return Completed(kept=False)

    def _breaker_open(self) -> bool:
        return bool(self._guard.breaker.current_state == pybreaker.STATE_OPEN)

    def _defer(self, error: Exception) -> Defer:
        if isinstance(error, RateLimitedError):
            delay = self._guard.limiter.retry_after_s()
            reason = "rate limited"
        else:
            delay = max(self._guard.breaker.seconds_until_probe(), 0.05)
            reason = "inventory circuit breaker open"
        return Defer(delay + random.uniform(0, 0.05), reason)
