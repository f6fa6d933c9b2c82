"""Application services: one method per use case, each one unit of work.

Servicers call these with validated plain values and get domain objects back; the rules live in
`domain`, the rows in `db`. Nothing here knows gRPC.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from application.paging import PageTokenCodec
from db.inventory import InventoryUnitOfWork
from db.orders import PageCursor
from db.unit_of_work import OrdersUnitOfWork
from domain import correlation
from domain.errors import ConflictError, IdempotencyKeyReusedError, NotFoundError
from domain.inventory import StockLevel
from domain.model import Order, OrderStatus, utcnow
from domain.validation import PlaceOrderCommand
from saga.signals import CommitSignals, OrderChanges, WakeUp

# How often a cancel without `expected_version` re-reads and retries after losing a race.
CANCEL_ATTEMPTS = 5


@dataclass(frozen=True)
class OrderPage:
    orders: list[Order]
    next_page_token: str


class OrderApplication:
    def __init__(
        self,
        orders_uow: Callable[..., OrdersUnitOfWork],
        inventory_uow: Callable[..., InventoryUnitOfWork],
        page_tokens: PageTokenCodec,
        signals: CommitSignals | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._orders_uow = orders_uow
        self._inventory_uow = inventory_uow
        self._page_tokens = page_tokens
        self._signals = signals or CommitSignals(WakeUp(), OrderChanges())
        self._clock = clock

    def place_order(self, command: PlaceOrderCommand) -> Order:
        """Store the order, its items and its ORDER_CREATED event in one transaction.

        Idempotency is insert-first: the unique key on request_id decides, and only a call that
        loses to it reads the stored order (a retry, or a concurrent twin). Reading first would
        cost every call a second transaction for the rare one that needs it."""
        fingerprint = command.fingerprint()
        order, placed = Order.place(command.customer_id, command.items, command.request_id, now=self._clock())
        correlation.set_order_id(order.order_id)
        # While a saga worker is idle, the event is written leased to this process and handed to
        # it after the commit: no claim round trip between the order and its saga.
        lease = self._signals.lease_new_events(1)
        try:
            with self._orders_uow() as uow:
                leased = uow.add_order(
                    order, fingerprint if command.request_id else None, [placed], correlation.current(), lease
                )
                uow.commit()
        except ConflictError:
            self._signals.lease_unused(lease)
            # An earlier or concurrent call with the same request_id holds the key: answer as it did.
            if command.request_id is None:
                raise
            existing = self._replay(command.request_id, fingerprint)
            if existing is None:
                raise
            return existing
        except BaseException:
            self._signals.lease_unused(lease)
            raise
        self._signals.events_committed(lease, leased, self._clock())
        self._signals.order_placed(order)
        return order

    def _replay(self, request_id: str, fingerprint: str) -> Order | None:
        with self._orders_uow(write=False) as uow:
            found = uow.orders.find_by_request_id(request_id)
        if found is None:
            return None
        order, stored_fingerprint = found
        correlation.set_order_id(order.order_id)
        if stored_fingerprint != fingerprint:
            raise IdempotencyKeyReusedError(
                f"request_id {request_id!r} was already used with a different request"
            )
        return order

    def get_order(self, order_id: str) -> Order:
        correlation.set_order_id(order_id)
        with self._orders_uow(write=False, single_statement=True) as uow:  # one SELECT (a join)
            order = uow.orders.get(order_id)
        if order is None:
            raise NotFoundError(f"order {order_id} not found")
        return order

    def list_orders(
        self, customer_id: str | None, status: OrderStatus | None, page_size: int, page_token: str
    ) -> OrderPage:
        status_name = status.value if status else None
        after = self._page_tokens.decode(page_token, customer_id, status_name) if page_token else None
        with self._orders_uow(write=False) as uow:
            found = uow.orders.page(customer_id=customer_id, status=status, after=after, limit=page_size + 1)
        page, more = found[:page_size], len(found) > page_size
        token = ""
        if more:
            last = page[-1]
            token = self._page_tokens.encode(
                PageCursor(last.create_time, last.order_id), customer_id, status_name
            )
        return OrderPage(page, token)

    def cancel_order(self, order_id: str, expected_version: int | None) -> Order:
        """PENDING or VALIDATED -> CANCELLED with an ORDER_CANCELLED event (the saga releases stock)."""
        correlation.set_order_id(order_id)
        for attempt in range(CANCEL_ATTEMPTS):
            with self._orders_uow() as uow:
                order = uow.orders.get(order_id)
                if order is None:
                    raise NotFoundError(f"order {order_id} not found")
                if expected_version is not None and order.version != expected_version:
                    raise ConflictError(
                        f"order {order_id} is at version {order.version}, not {expected_version}"
                    )
                cancelled, event = order.cancel(now=self._clock())
                if uow.orders.save(cancelled):
                    uow.outbox.add([event], correlation.current(), cancelled.update_time)
                    uow.commit()
                    self._signals.outbox_committed(order_id)
                    self._signals.order_changed(order_id, cancelled)
                    return cancelled
            if expected_version is not None:
                raise ConflictError(f"order {order_id} changed concurrently")
            time.sleep(random.uniform(0, 0.005 * (2**attempt)))
        raise ConflictError(f"order {order_id} kept changing; cancel not applied")

    def set_stock(self, sku: str, available: int) -> StockLevel:
        with self._inventory_uow() as uow:
            level = uow.stock.set_available(sku, available, self._clock())
            uow.commit()
        return level

    def get_stock(self, sku: str) -> StockLevel:
        with self._inventory_uow(write=False, single_statement=True) as uow:
            level = uow.stock.get(sku)
        if level is None:
            raise NotFoundError(f"SKU {sku!r} not found")
        return level
