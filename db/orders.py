"""Order repository: rows of `orders` and `order_items` to and from the Order aggregate."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import Row, Select, Table, Update, and_, bindparam, insert, or_, select, update

from db import clock, precompiled
from db.driver import Statements
from db.tables import order_items, orders
from domain.model import Order, OrderItem, OrderStatus, Settlement

Row_ = dict[str, Any]


@dataclass(frozen=True)
class PageCursor:
    """Keyset position: the last (create_time, order_id) of the previous page, newest first."""

    create_time: datetime
    order_id: str


class OrderRepository:
    def __init__(self, connection: Statements) -> None:
        self._c = connection

    def add(self, order: Order, request_fingerprint: str | None = None) -> None:
        for table, rows in self.new_rows(order, request_fingerprint):
            self._c.execute(insert(table), rows)

    @staticmethod
    def new_rows(order: Order, request_fingerprint: str | None = None) -> list[tuple[Table, list[Row_]]]:
        """The rows that store a new order: its own, then its items (see `add`)."""
        row = {
            "id": order.order_id,
            "customer_id": order.customer_id,
            "status": order.status.value,
            "failure_reason": order.failure_reason,
            "version": order.version,
            "request_id": order.request_id,
            "request_fingerprint": request_fingerprint,
            "create_time": order.create_time,
            "update_time": order.update_time,
        }
        items = [
            {"order_id": order.order_id, "position": i, "sku": item.sku, "quantity": item.quantity}
            for i, item in enumerate(order.items)
        ]
        return [(orders, [row]), (order_items, items)]

    def get(self, order_id: str) -> Order | None:
        rows = self._c.execute(_order_with_items(), {"order_id": order_id}).all()
        if not rows:
            return None
        return _order(rows[0], [OrderItem(row.sku, row.quantity) for row in rows if row.sku is not None])

    def find_by_request_id(self, request_id: str) -> tuple[Order, str | None] | None:
        """The order placed with this idempotency key, and the fingerprint of its request."""
        row = self._c.execute(select(orders).where(orders.c.request_id == request_id)).first()
        if row is None:
            return None
        return self._load([row])[0], row.request_fingerprint

    def save(self, order: Order) -> bool:
        """Write a changed order if the stored one is still at `order.version - 1`; False if not."""
        result = self._c.execute(
            update(orders)
            .where(orders.c.id == order.order_id, orders.c.version == order.version - 1)
            .values(
                status=order.status.value,
                failure_reason=order.failure_reason,
                version=order.version,
                update_time=order.update_time,
            )
        )
        return result.rowcount == 1

    def settle_pending(self, order_id: str, settlement: Settlement, now: datetime) -> bool:
        """Move the order from PENDING as `settlement` says, one version up; False if it is not
        PENDING.

        The saga settles without reading the order first: the status in the WHERE clause is the
        compare-and-set (PostgreSQL re-checks it after waiting on a concurrent writer), and the
        version still moves, so a client holding the old version sees the change."""
        parameters = self.settle_parameters(order_id, settlement, now)
        return precompiled.execute(self._c, settle_pending_statement(), parameters).rowcount == 1

    def settle_pending_many(
        self, order_ids: Sequence[str], settlement: Settlement, now: datetime
    ) -> set[str]:
        """`settle_pending` for several orders settled alike, in one statement: the ids settled
        (those still PENDING). For SQLite's batch saga (`OrdersUnitOfWork.settle_and_complete_many`)."""
        if not order_ids:
            return set()
        parameters = {
            "order_ids": list(order_ids),
            "target": settlement.status.value,
            "reason": settlement.reason,
            "now": now,
        }
        return set(self._c.execute(settle_pending_many_statement(), parameters).scalars())

    @staticmethod
    def settle_parameters(order_id: str, settlement: Settlement, now: datetime) -> dict[str, Any]:
        """The parameters of `settle_pending_statement` (see `settle_pending`)."""
        return {
            "order_id": order_id,
            "target": settlement.status.value,
            "reason": settlement.reason,
            "now": now,
        }

    def pending_since(self, older_than: timedelta, limit: int, now: datetime) -> list[Order]:
        """PENDING orders created more than `older_than` ago by the database's clock (`db.clock`;
        `now` on SQLite), oldest first: sagas that should have settled."""
        dialect = self._c.dialect.name
        rows = self._c.execute(
            select(orders)
            .where(
                orders.c.status == OrderStatus.PENDING.value,
                orders.c.create_time < clock.later(dialect, "age_s"),
            )
            .order_by(orders.c.create_time)
            .limit(limit),
            clock.parameters(now, age_s=-older_than.total_seconds()),
        ).all()
        return self._load(rows)

    def page(
        self,
        *,
        customer_id: str | None,
        status: OrderStatus | None,
        after: PageCursor | None,
        limit: int,
    ) -> list[Order]:
        """Orders newest first (create_time, then id, both descending), after the cursor."""
        query = select(orders)
        if customer_id is not None:
            query = query.where(orders.c.customer_id == customer_id)
        if status is not None:
            query = query.where(orders.c.status == status.value)
        if after is not None:
            query = query.where(
                or_(
                    orders.c.create_time < after.create_time,
                    and_(orders.c.create_time == after.create_time, orders.c.id < after.order_id),
                )
            )
        query = query.order_by(orders.c.create_time.desc(), orders.c.id.desc()).limit(limit)
        return self._load(self._c.execute(query).all())

    def _load(self, rows: Sequence[Row[tuple[object, ...]]]) -> list[Order]:
        if not rows:
            return []
        ids = [row.id for row in rows]
        items: dict[str, list[OrderItem]] = defaultdict(list)
        item_rows = self._c.execute(
            select(order_items.c.order_id, order_items.c.sku, order_items.c.quantity)
            .where(order_items.c.order_id.in_(ids))
            .order_by(order_items.c.order_id, order_items.c.position)
        )
        for item in item_rows:
            items[item.order_id].append(OrderItem(item.sku, item.quantity))
        return [_order(row, items[row.id]) for row in rows]


def _order(row: Row[Any], items: list[OrderItem]) -> Order:
    return Order(
        order_id=row.id,
        customer_id=row.customer_id,
        items=tuple(items),
        status=OrderStatus(row.status),
        version=row.version,
        create_time=row.create_time,
        update_time=row.update_time,
        failure_reason=row.failure_reason,
        request_id=row.request_id,
    )


# Statements of the hot paths (GetOrder, WatchOrder, the saga's settle), built once: SQLAlchemy
# then only binds parameters.


@lru_cache(maxsize=1)
def _order_with_items() -> Select[Any]:
    """The order's row once per item, with the item's SKU and quantity: one query, not two."""
    return (
        select(orders, order_items.c.sku, order_items.c.quantity)
        .outerjoin(order_items, order_items.c.order_id == orders.c.id)
        .where(orders.c.id == bindparam("order_id"))
        .order_by(order_items.c.position)
    )


@lru_cache(maxsize=1)
def settle_pending_statement() -> Update:
    """`settle_pending`'s compare-and-set; the orders unit of work also runs it as a CTE of the
    event's completion (`OrdersUnitOfWork.settle_and_complete`)."""
    return settling(bindparam("order_id"), bindparam("target"), bindparam("reason"))


@lru_cache(maxsize=1)
def settle_pending_many_statement() -> Update:
    """`settle_pending_statement` for the orders `:order_ids` (an expanding IN), RETURNING the ids
    it settled."""
    settle = settling(None, bindparam("target"), bindparam("reason"))
    return settle.where(orders.c.id.in_(bindparam("order_ids", expanding=True))).returning(orders.c.id)


def settling(order_id: Any, target: Any, reason: Any) -> Update:
    """The saga's compare-and-set of an order on PENDING, from parameters or (a batch's, see
    `db.settlement`) columns; `now` is a parameter. With `order_id` None, the caller adds which
    orders."""
    which = [orders.c.status == OrderStatus.PENDING.value]
    if order_id is not None:  # else the caller names the orders
        which.append(orders.c.id == order_id)
    return (
        update(orders)
        .where(*which)
        .values(
            status=target,
            failure_reason=reason,
            version=orders.c.version + 1,
            update_time=bindparam("now", type_=orders.c.update_time.type),
        )
    )
