"""The inventory saga: ORDER_CREATED reserves stock and settles the order; ORDER_CANCELLED releases.

Steps of ORDER_CREATED, each idempotent so that at-least-once delivery has exactly-once effects:

1. Reserve all items or none, in the inventory's own transaction (`InventoryParticipant`), through
   the rate limiter and the circuit breaker. Reservations are keyed by order id: a redelivery
   finds them and reserves nothing more.
2. Settle the order in the orders database, version-checked: VALIDATED when reserved, FAILED with
   the reason when not (the compensating transaction; nothing was reserved).
3. If the order changed under the saga (cancelled meanwhile), release what was reserved.

An open breaker or a denied rate limit defers the event without using an attempt; transient
errors retry; past `max_attempts` or `saga_timeout_s` the order is FAILED ("inventory
unavailable") and anything reserved is released. A malformed event raises and ends DEAD.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

import pybreaker

from db.outbox import ClaimedEvent
from db.unit_of_work import InventoryUnitOfWork, OrdersUnitOfWork
from domain.errors import ConflictError
from domain.events import OrderCancelled, OrderExpired, OrderPlaced
from domain.inventory import ReservationOutcome, Reserved
from domain.model import Order, OrderItem, OrderStatus, utcnow
from saga.dispatcher import Defer, Done, Handler, Retry, Verdict
from saga.faults import FaultSwitches
from saga.resilience import BreakerOpenError, Guard, RateLimitedError

log = logging.getLogger("orders.saga")

INVENTORY_UNAVAILABLE = "inventory unavailable"

T = TypeVar("T")


class MalformedEventError(Exception):
    """The event cannot be understood; retrying will not help, so it ends DEAD."""


def parse_order_id(raw: str) -> str:
    try:
        payload = json.loads(raw)
        order_id = payload["order_id"]
    except (ValueError, TypeError, KeyError) as error:
        raise MalformedEventError(f"payload is not an order event: {error}") from error
    if not isinstance(order_id, str) or not order_id:
        raise MalformedEventError("payload has no order_id")
    return order_id


@dataclass(frozen=True)
class SagaSettings:
    max_attempts: int = 8
    saga_timeout_s: float = 600.0
    conflict_attempts: int = 5


class InventoryParticipant:
    """The inventory side: every call is one transaction on the inventory engine, retried a few
    times with jitter when it loses a race (deadlock, serialization failure, duplicate key)."""

    def __init__(
        self,
        uow: Callable[[], InventoryUnitOfWork],
        faults: FaultSwitches | None = None,
        conflict_attempts: int = 5,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._uow = uow
        self._faults = faults or FaultSwitches()
        self._conflict_attempts = conflict_attempts
        self._clock = clock
        self.conflict_retries = 0

    def _inject(self) -> None:
        self._faults.maybe_delay("inventory_delay_s")
        self._faults.maybe_fail("inventory_error")

    def reserve(self, order_id: str, items: tuple[OrderItem, ...]) -> ReservationOutcome:
        self._inject()

        def attempt() -> ReservationOutcome:
            with self._uow() as uow:
                outcome = uow.stock.reserve(order_id, items, self._clock())
                if isinstance(outcome, Reserved):
                    uow.commit()
                return outcome  # Rejected: leaving the block rolls back what was taken

        return self._with_conflict_retries(attempt)

    def release(self, order_id: str, items: tuple[OrderItem, ...] = ()) -> list[OrderItem]:
        """Release what the order holds and close it to later reservations (see StockRepository)."""
        self._inject()

        def attempt() -> list[OrderItem]:
            with self._uow() as uow:
                released = uow.stock.release(order_id, self._clock(), items)
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
        participant: InventoryParticipant,
        guard: Guard,
        settings: SagaSettings,
        on_order_changed: Callable[[str], None] = lambda _order_id: None,
        faults: FaultSwitches | None = None,
        clock: Callable[[], datetime] = utcnow,
        on_outcome: Callable[[str], None] = lambda _outcome: None,
    ) -> None:
        self._on_outcome = on_outcome
        self._orders_uow = orders_uow
        self._participant = participant
        self._guard = guard
        self._settings = settings
        self._on_order_changed = on_order_changed
        self._faults = faults or FaultSwitches()
        self._clock = clock

    def handlers(self) -> dict[str, Handler]:
        return {
            OrderPlaced.event_type: self.on_order_created,
            OrderCancelled.event_type: self.on_order_cancelled,
            OrderExpired.event_type: self.on_order_cancelled,  # the same compensation: release
        }

    def on_order_created(self, event: ClaimedEvent) -> Verdict:
        order_id = parse_order_id(event.payload)
        order = self._load(order_id)
        if order.status is not OrderStatus.PENDING:
            # Settled by an earlier delivery, or cancelled/failed meanwhile: make sure nothing
            # stays reserved for an order that is not VALIDATED.
            return Done() if order.status is OrderStatus.VALIDATED else self._release(order, event)
        if self._clock() - order.create_time > timedelta(seconds=self._settings.saga_timeout_s):
            return self._give_up(order, event, "saga timed out")
        try:
            outcome = self._guard.call(self._participant.reserve, order_id, order.items)
        except (BreakerOpenError, RateLimitedError) as error:
            return self._defer(error)
        except Exception as error:
            if self._breaker_open():
                return self._defer(error)  # an outage (this call tripped it, or a probe failed)
            if event.attempts + 1 >= self._settings.max_attempts:
                return self._give_up(order, event, str(error))
            return Retry(f"reserve failed: {type(error).__name__}: {error}")
        self._faults.maybe_crash("crash_after_reserve")
        if isinstance(outcome, Reserved):
            log.info("stock reserved for order %s", order_id)
            return self._settle(order, order.validate(now=self._clock()), event)
        log.info("order %s cannot be reserved: %s", order_id, outcome.reason)
        # Close the order in the inventory before failing it, so that no step of this saga still
        # running elsewhere (a lost lease) can reserve for an order that is already FAILED.
        closed = self._release(order, event)
        if not isinstance(closed, Done):
            return closed
        return self._settle(order, order.fail(outcome.reason, now=self._clock()), event)

    def on_order_cancelled(self, event: ClaimedEvent) -> Verdict:
        return self._release(self._load(parse_order_id(event.payload)), event)

    def _load(self, order_id: str) -> Order:
        with self._orders_uow(write=False) as uow:
            order = uow.orders.get(order_id)
        if order is None:
            raise MalformedEventError(f"order {order_id} does not exist")
        return order

    def _save(self, changed: Order, outcome: str) -> bool:
        """Write the order version-checked; on success tell watchers and metrics. False if the order
        moved under the saga."""
        with self._orders_uow() as uow:
            saved = uow.orders.save(changed)
            if saved:
                uow.commit()
        if saved:
            self._on_order_changed(changed.order_id)
            self._on_outcome(outcome)
        return saved

    def _settle(self, order: Order, changed: Order, event: ClaimedEvent) -> Verdict:
        if self._save(changed, changed.status.value.lower()):
            log.info(
                "order %s is %s%s",
                order.order_id,
                changed.status.value,
                f": {changed.failure_reason}" if changed.failure_reason else "",
            )
            return Done()
        # The order moved under us (a cancel won the race): undo what this saga reserved.
        current = self._load(order.order_id)
        log.info("order %s became %s during the saga", order.order_id, current.status.value)
        if current.status is OrderStatus.VALIDATED:
            return Done()
        if current.status is OrderStatus.PENDING:
            return Retry("order changed concurrently and is still PENDING")
        return self._release(current, event)

    def _give_up(self, order: Order, event: ClaimedEvent, why: str) -> Verdict:
        log.warning("giving up on order %s after %d attempts: %s", order.order_id, event.attempts + 1, why)
        self._save(order.fail(INVENTORY_UNAVAILABLE, now=self._clock()), "gave_up")
        # Whatever an earlier attempt may have reserved goes back; if the inventory is still down,
        # the retry comes back here through the "not PENDING" path.
        try:
            self._participant.release(order.order_id, order.items)
        except Exception as error:
            # Not an attempt (this one may be the last): the event must come back to release.
            return self._defer(error)
        return Done()

    def _release(self, order: Order, event: ClaimedEvent) -> Verdict:
        order_id = order.order_id
        try:
            released = self._guard.call(self._participant.release, order_id, order.items)
        except (BreakerOpenError, RateLimitedError) as error:
            return self._defer(error)
        except Exception as error:
            if self._breaker_open():
                return self._defer(error)
            return Retry(f"release failed: {type(error).__name__}: {error}")
        if released:
            log.info("released %d reserved item(s) of order %s", len(released), order_id)
            self._on_outcome("released")
        return Done()

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
