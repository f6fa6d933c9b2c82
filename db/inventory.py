"""Stock repository: set and read stock, reserve all items of an order or none, release them.

Reservation is a guarded decrement (`available = available - q WHERE available >= q`): at READ
COMMITTED it never oversells and never fails under contention (PostgreSQL re-checks the guard on
the newest row after a lock wait); a row not decremented means "not enough". Rows are locked in
SKU order (Python's `sorted`, which is PostgreSQL's `COLLATE "C"`) so that two orders never wait
on each other in a cycle. Reservations are keyed by (order_id, sku): a redelivered event finds
them and reserves nothing.

A batch of orders reserves in one transaction (`reserve_many`): the fences, then the batch's
stock levels (on PostgreSQL its rows locked in SKU order) allocated in Python
(`domain.allocation`), then the writes: on PostgreSQL in one statement, on SQLite, whose writer
holds the whole database, in a few.

Why one module of this size: the reservation statements and the repository that runs them share
the lock order (fence, reservations, stock rows by SKU) that keeps concurrent steps deadlock-free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    Select,
    String,
    Update,
    any_,
    bindparam,
    exists,
    func,
    insert,
    literal,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql

from db import precompiled
from db.backend import backend_of
from db.chained import insert_together, statements_for
from db.driver import Statements
from db.tables import reservation_fences, stock, stock_reservations
from db.unit_of_work import UnitOfWork
from domain.allocation import ReservationRequest, allocate
from domain.fencing import Fence
from domain.inventory import (
    Rejected,
    ReservationOutcome,
    Reserved,
    StockLevel,
    Superseded,
    insufficient_stock,
    unknown_sku,
)
from domain.model import OrderItem

ACTIVE = "ACTIVE"
RELEASED = "RELEASED"


# The saga's statements, built once (SQLAlchemy then only binds parameters; building them per
# call was a large part of the saga's CPU in a profile).


@lru_cache(maxsize=1)
def _reservation_statuses() -> Select[Any]:
    return select(stock_reservations.c.status).where(stock_reservations.c.order_id == bindparam("order_id"))


def _taking(quantity: Any, now: Any) -> dict[str, Any]:
    """What taking `quantity` of a stock row writes (every reservation path's decrement)."""
    return {
        "available": stock.c.available - quantity,
        "reserved": stock.c.reserved + quantity,
        "version": stock.c.version + 1,
        "update_time": now,
    }


def _giving_back(quantity: Any, now: Any) -> dict[str, Any]:
    """What handing back `quantity` that this transaction took (`_taking`) writes: the row as it
    was before, its version too, since the row stayed locked from the decrement on and nobody saw
    the change (only its update time moves). Stock a refused order touched reads unchanged."""
    return {
        "available": stock.c.available + quantity,
        "reserved": stock.c.reserved - quantity,
        "version": stock.c.version - 1,
        "update_time": now,
    }


@lru_cache(maxsize=1)
def _guarded_decrement() -> Update:
    quantity = bindparam("quantity", type_=Integer)
    return (
        update(stock)
        .where(stock.c.sku == bindparam("b_sku"), stock.c.available >= quantity)
        .values(_taking(quantity, bindparam("now", type_=stock.c.update_time.type)))
    )


@lru_cache(maxsize=2)
def _fence_statement(dialect: str) -> Any:
    """Record a step's fence as the order's newest, unless a newer one is there: RETURNING a row
    only when the step may write. On conflict the row is locked, so a concurrent step of the same
    order waits here for this one's commit, and then compares against what it wrote."""
    statement = backend_of(dialect).upsert(reservation_fences).values(
        order_id=bindparam("order_id", type_=String),
        event_id=bindparam("fence_event", type_=reservation_fences.c.event_id.type),
        claim=bindparam("fence_claim", type_=Integer),
        update_time=bindparam("now", type_=reservation_fences.c.update_time.type),
    )
    return _newest_fence_wins(statement)


@lru_cache(maxsize=64)
def _fence_rows_statement(count: int) -> Any:
    """`_fence_statement` for `count` orders in one multi-row upsert (SQLite's batch: PostgreSQL's
    takes arrays, `_fence_many`); the parameters are `f_order_<n>`, `f_event_<n>`, `f_claim_<n>`
    and `now`."""
    f = reservation_fences
    now = bindparam("now", type_=f.c.update_time.type)
    rows = [
        {
            "order_id": bindparam(f"f_order_{n}", type_=String),
            "event_id": bindparam(f"f_event_{n}", type_=f.c.event_id.type),
            "claim": bindparam(f"f_claim_{n}", type_=Integer),
            "update_time": now,
        }
        for n in range(count)
    ]
    return _newest_fence_wins(backend_of("sqlite").upsert(f).values(rows))


def _newest_fence_wins(statement: Any) -> Any:
    """`statement` (an upsert of fences) keeping, per order, the newest fence; RETURNING the orders
    whose fence it recorded (see `_fence_statement`)."""
    newer = statement.excluded
    return statement.on_conflict_do_update(
        index_elements=[reservation_fences.c.order_id],
        set_={"event_id": newer.event_id, "claim": newer.claim, "update_time": newer.update_time},
        where=tuple_(reservation_fences.c.event_id, reservation_fences.c.claim)
        <= tuple_(newer.event_id, newer.claim),
    ).returning(reservation_fences.c.order_id)


def _reservation_rows(
    order_id: str, items: Sequence[OrderItem], now: datetime, status: str = ACTIVE
) -> list[dict[str, Any]]:
    """The reservation rows of an order's items: ACTIVE (the per-item path, `StockRepository.reserve`,
    and SQLite's batch), or RELEASED (a refused order of SQLite's batch, closed)."""
    return [
        {
            "order_id": order_id,
            "sku": item.sku,
            "quantity": item.quantity,
            "status": status,
            "create_time": now,
            "update_time": now,
        }
        for item in items
    ]


def hot_statements(dialect: str, most_items: int, most_batch: int = 16) -> list[Any]:
    """The statements of a saga's reservation on this dialect, for `db.warm` to compile at start:
    the per-order and the batch path on PostgreSQL; on SQLite the per-item path and the batch's,
    whose statements are built per size (orders of up to `most_items` items, batches of up to
    `most_batch` orders, as many reservation rows: larger ones compile at first use)."""
    if backend_of(dialect).one_statement_writes:
        return [
            _reserve_all(),
            _reserve_all(fenced=True),
            _close_refused(),
            _fence_many(),
            _earlier_reservations(),
            _locked_levels(),
            _apply_allocation(),
        ]
    now = datetime.now(UTC)
    rows = [
        statement
        for count in range(1, max(most_items, most_batch) + 1)
        for statement, _, _ in statements_for(
            dialect, [(stock_reservations, _reservation_rows("o", [OrderItem("s", 1)] * count, now))]
        )
    ]
    closing = [_give_back(), _release_booked(), _record_closed()]
    fences = [_fence_rows_statement(count) for count in range(2, most_batch + 1)]
    return [_fence_statement(dialect), _guarded_decrement(), *closing, *rows, *fences]


def _fence_parameters(order_id: str, fence: Fence, now: datetime) -> dict[str, Any]:
    return {"order_id": order_id, "fence_event": fence.event_id, "fence_claim": fence.claim, "now": now}


@lru_cache(maxsize=2)
def _reserve_all(fenced: bool = False) -> Select[Any]:
    """A first delivery's whole reservation on PostgreSQL in one statement, where the per-item path
    runs 1 + N (each costs SQLAlchemy a few hundred microseconds of CPU, and a multi-row insert
    more): per stock row of the order, its SKU, what was available when it was locked, and whether
    it was decremented.

        WITH booked AS (INSERT INTO stock_reservations ... SELECT FROM unnest(:skus, :quantities)
                        RETURNING sku, quantity),
             locked AS (SELECT sku, available FROM stock WHERE sku = ANY(:skus)
                        ORDER BY sku COLLATE "C" FOR UPDATE),
             taken  AS (UPDATE stock SET <guarded decrement> FROM booked, locked
                        WHERE stock.sku = booked.sku AND locked.sku = booked.sku
                          AND stock.available >= booked.quantity RETURNING stock.sku)
        SELECT locked.sku, locked.available, taken.sku IS NOT NULL AS taken
        FROM locked LEFT JOIN taken ON taken.sku = locked.sku

    `locked` takes the row locks in SKU order, each before its row is decremented; the UPDATE joins
    it because PostgreSQL runs a SELECT in WITH only as far as it is read. After a lock wait both
    read the newest row: the guard is checked again on it, as in the per-item UPDATE, and a row not
    taken answers the `available` a refusal names (no read of the stock after it). A duplicate
    reservation key fails the whole statement, as the per-item insert does. A SKU without a stock
    row is booked (reservations do not reference stock) but neither locked nor taken.

    `fenced`: the step's fence goes in first as a CTE of its own (`_fence_statement`), nothing is
    booked unless it was accepted, and the statement answers `fenced` (1 or 0) beside each SKU."""
    skus = bindparam("skus", type_=postgresql.ARRAY(String))
    now = bindparam("now", type_=stock.c.update_time.type)
    fence = _fence_statement("postgresql").cte("fenced") if fenced else None
    wanted = (
        func.unnest(skus, bindparam("quantities", type_=postgresql.ARRAY(Integer)))
        .table_valued("sku", "quantity")
        .render_derived(name="wanted")
    )
    booked = (
        insert(stock_reservations)
        .from_select(
            ["order_id", "sku", "quantity", "status", "create_time", "update_time"],
            select(
                bindparam("order_id", type_=String),
                wanted.c.sku,
                wanted.c.quantity,
                literal(ACTIVE, String),
                now,
                now,
            ).where(*(() if fence is None else (exists(select(fence.c.order_id)),))),
        )
        .returning(stock_reservations.c.sku, stock_reservations.c.quantity)
        .cte("booked")
    )
    locked = (
        select(stock.c.sku, stock.c.available)
        .where(stock.c.sku == any_(skus))
        .order_by(stock.c.sku.collate("C"))
        .with_for_update()
        .cte("locked")
    )
    taken = (
        update(stock)
        .where(
            stock.c.sku == booked.c.sku,
            locked.c.sku == booked.c.sku,
            stock.c.available >= booked.c.quantity,
        )
        .values(_taking(booked.c.quantity, now))
        .returning(stock.c.sku)
        .cte("taken")
    )
    levels = locked.outerjoin(taken, taken.c.sku == locked.c.sku)
    columns = (locked.c.sku, locked.c.available, taken.c.sku.is_not(None).label("taken"))
    if fence is None:
        return select(*columns).select_from(levels)
    accepted = select(func.count()).select_from(fence).scalar_subquery().label("fenced")
    one = select(literal(1).label("one")).subquery("one")
    return select(accepted, *columns).select_from(one.outerjoin(levels, true()))


# A fenced refusal closes the order in the reservation's own transaction (`StockRepository._refuse`).


@lru_cache(maxsize=1)
def _close_refused() -> Select[Any]:
    """On PostgreSQL, a refused order's close in one statement, on rows the reservation locked:

        WITH returned AS (UPDATE stock SET <give back> FROM unnest(:g_skus, :g_quantities) ...),
             released AS (UPDATE stock_reservations SET status = 'RELEASED'
                          WHERE order_id = :order_id AND status = 'ACTIVE'),
             closed   AS (UPDATE reservation_fences SET closed_reason = :reason
                          WHERE order_id = :order_id)
        SELECT count(returned), count(released), count(closed)"""
    now = bindparam("now", type_=stock.c.update_time.type)
    given = _arrays(g_skus=String, g_quantities=Integer).render_derived("given")
    returned = (
        update(stock)
        .where(stock.c.sku == given.c.g_skus)
        .values(_giving_back(given.c.g_quantities, now))
        .returning(stock.c.sku)
        .cte("returned")
    )
    released = _release_booked().returning(stock_reservations.c.sku).cte("released")
    closed = _record_closed().returning(reservation_fences.c.order_id).cte("closed")
    return select(
        *(
            select(func.count()).select_from(cte).scalar_subquery().label(cte.name)
            for cte in (returned, released, closed)
        )
    )


@lru_cache(maxsize=1)
def _give_back() -> Update:
    """SQLite's give-back of one SKU a refused order had taken."""
    quantity = bindparam("quantity", type_=Integer)
    now = bindparam("now", type_=stock.c.update_time.type)
    return update(stock).where(stock.c.sku == bindparam("b_sku")).values(_giving_back(quantity, now))


@lru_cache(maxsize=1)
def _release_booked() -> Update:
    """The order's ACTIVE reservation rows RELEASED."""
    r = stock_reservations
    return (
        update(r)
        .where(r.c.order_id == bindparam("order_id", type_=String), r.c.status == ACTIVE)
        .values(status=RELEASED, update_time=bindparam("now", type_=r.c.update_time.type))
    )


@lru_cache(maxsize=1)
def _record_closed() -> Update:
    """Why the saga closed the order, on its fence row (see `StockRepository.release`)."""
    f = reservation_fences
    return (
        update(f)
        .where(f.c.order_id == bindparam("order_id", type_=String))
        .values(closed_reason=bindparam("reason", type_=String))
    )


@lru_cache(maxsize=1)
def _levels_of() -> Select[Any]:
    """The available stock of the SKUs `:skus` (an expanding IN), for SQLite's batch allocation."""
    return select(stock.c.sku, stock.c.available).where(stock.c.sku.in_(bindparam("skus", expanding=True)))


# The set-based reservation of a batch of orders (`StockRepository.reserve_many`) on PostgreSQL:
# array parameters, and the writes as data-modifying CTEs of one statement.


def _arrays(**columns: Any) -> Any:
    """`unnest(:a, :b, ...) AS name(a, b, ...)`: rows from array parameters of the given types."""
    arrays = [bindparam(name, type_=postgresql.ARRAY(kind)) for name, kind in columns.items()]
    return func.unnest(*arrays).table_valued(*columns)


@lru_cache(maxsize=1)
def _fence_many() -> Any:
    """`_fence_statement` for the orders of a batch, in order id order: two batches (a step that
    outlived its lease and the one that took over) lock their orders' fence rows in one order."""
    rows = _arrays(order_ids=String, fence_events=BigInteger, fence_claims=Integer).render_derived("f")
    now = bindparam("now", type_=reservation_fences.c.update_time.type)
    source = select(rows.c.order_ids, rows.c.fence_events, rows.c.fence_claims, now)
    source = source.order_by(rows.c.order_ids)
    upsert = postgresql.insert(reservation_fences).from_select(
        ["order_id", "event_id", "claim", "update_time"], source
    )
    return _newest_fence_wins(upsert)


@lru_cache(maxsize=1)
def _earlier_reservations() -> Select[Any]:
    """Per order of the batch that has reservation rows: whether one is ACTIVE, and why the saga
    closed the order if it did (see `StockRepository.release`)."""
    r, f = stock_reservations, reservation_fences
    return (
        select(r.c.order_id, func.bool_or(r.c.status == ACTIVE).label("active"), f.c.closed_reason)
        .select_from(r.outerjoin(f, f.c.order_id == r.c.order_id))
        .where(r.c.order_id == any_(bindparam("order_ids", type_=postgresql.ARRAY(String))))
        .group_by(r.c.order_id, f.c.closed_reason)
    )


@lru_cache(maxsize=1)
def _locked_levels() -> Select[Any]:
    """The batch's stock rows, locked in SKU order (as every reservation locks them)."""
    skus = bindparam("skus", type_=postgresql.ARRAY(String))
    return (
        select(stock.c.sku, stock.c.available)
        .where(stock.c.sku == any_(skus))
        .order_by(stock.c.sku.collate("C"))
        .with_for_update()
    )


@lru_cache(maxsize=1)
def _apply_allocation() -> Select[Any]:
    """A batch's allocation in one statement, on stock rows `_locked_levels` locked:

        WITH booked AS (INSERT INTO stock_reservations ... SELECT FROM unnest(...)),  -- ACTIVE, RELEASED
             taken  AS (UPDATE stock ... FROM unnest(:skus, :totals) WHERE available >= total),
             closed AS (UPDATE reservation_fences SET closed_reason ... FROM unnest(...))
        SELECT count(taken)

    The guard on `available` is a second check of what the allocation decided (and the CHECK
    constraint a third): the caller compares the SKUs taken with those it asked for."""
    now = bindparam("now", type_=stock.c.update_time.type)
    rows = _arrays(
        r_orders=String, r_skus=String, r_quantities=Integer, r_statuses=String
    ).render_derived("booking")
    booked = (
        insert(stock_reservations)
        .from_select(
            ["order_id", "sku", "quantity", "status", "create_time", "update_time"],
            select(rows.c.r_orders, rows.c.r_skus, rows.c.r_quantities, rows.c.r_statuses, now, now),
        )
        .returning(stock_reservations.c.sku)
        .cte("booked")
    )
    totals = _arrays(t_skus=String, t_quantities=Integer).render_derived("totals")
    taken = (
        update(stock)
        .where(stock.c.sku == totals.c.t_skus, stock.c.available >= totals.c.t_quantities)
        .values(_taking(totals.c.t_quantities, now))
        .returning(stock.c.sku)
        .cte("taken")
    )
    reasons = _arrays(c_orders=String, c_reasons=String).render_derived("reasons")
    closed = (
        update(reservation_fences)
        .where(reservation_fences.c.order_id == reasons.c.c_orders)
        .values(closed_reason=reasons.c.c_reasons)
        .returning(reservation_fences.c.order_id)
        .cte("closed")
    )
    return select(
        select(func.count()).select_from(taken).scalar_subquery().label("taken"),
        select(func.count()).select_from(booked).scalar_subquery().label("booked"),
        select(func.count()).select_from(closed).scalar_subquery().label("closed"),
    )


def _earlier_outcome(active: bool, closed_reason: str | None) -> ReservationOutcome:
    """The outcome for an order that reserved before: its reservation again (a redelivery), or,
    closed by a release, the reason it was closed for."""
    if active:
        return Reserved(fresh=False)
    return Rejected(closed_reason or "reservation was already released")


class StockRepository:
    def __init__(self, connection: Statements) -> None:
        self._c = connection

    def set_available(self, sku: str, available: int, now: datetime) -> StockLevel:
        new_row = backend_of(self._c).upsert(stock).values(
            sku=sku, available=available, reserved=0, version=1, update_time=now
        )
        statement = new_row.on_conflict_do_update(
            index_elements=[stock.c.sku],
            set_={"available": available, "version": stock.c.version + 1, "update_time": now},
        ).returning(stock.c.sku, stock.c.available, stock.c.reserved, stock.c.version)
        row = self._c.execute(statement).one()
        return StockLevel(row.sku, row.available, row.reserved, row.version)

    def get(self, sku: str) -> StockLevel | None:
        row = self._c.execute(
            select(stock.c.sku, stock.c.available, stock.c.reserved, stock.c.version).where(
                stock.c.sku == sku
            )
        ).first()
        return None if row is None else StockLevel(row.sku, row.available, row.reserved, row.version)

    def reservation_status(self, order_id: str) -> str | None:
        """ACTIVE or RELEASED for an order that reserved before, None if it never did."""
        statuses = set(self._c.execute(_reservation_statuses(), {"order_id": order_id}).scalars())
        if not statuses:
            return None
        return ACTIVE if ACTIVE in statuses else RELEASED

    def fence(self, order_id: str, fence: Fence, now: datetime) -> bool:
        """Record `fence` as the order's newest writer; False (and nothing written) if a newer step
        of the order wrote before. Fenced writes call it first, in their own transaction."""
        statement = _fence_statement(self._c.dialect.name)
        return (
            precompiled.execute(self._c, statement, _fence_parameters(order_id, fence, now)).first()
            is not None
        )

    def reserve(
        self,
        order_id: str,
        items: Sequence[OrderItem],
        now: datetime,
        check_first: bool = True,
        fence: Fence | None = None,
    ) -> ReservationOutcome:
        """Reserve every item, or refuse the order.

        What the caller commits: with a `fence` (a saga step), anything but Superseded; without
        one, a fresh Reserved only, and it rolls back anything else. A fenced refusal closes the
        order in the same transaction, as `release` with the reason would (the saga fails a
        refused order, and a late step of its saga then finds it closed): what was taken goes back,
        the reservation rows are RELEASED and the reason is recorded. One transaction, where a
        rollback and a release took two, and on PostgreSQL one statement more than a reservation.

        An order that reserved before is Reserved again, not fresh (a redelivery); one closed by a
        release (see `release`) is Rejected, so a late step of its saga cannot take stock any more.

        The reservation rows go in first: their key (order, SKU) is the check that the order never
        reserved and was never closed, and a stock row is locked only for its decrement and the
        commit, not for the insert too (on a hot SKU every reservation queues on that lock).
        `check_first=False` skips reading earlier reservations up front, for a first delivery,
        which almost never has any: an order that has them makes the insert fail on its key, a
        ConflictError after which the caller tries again with the check.

        On PostgreSQL a first delivery is one statement (`_reserve_all`), not one per item; SQLite
        has no data-modifying WITH and takes the per-item path.

        With a `fence`, Superseded (nothing written) if a newer step of the order wrote before."""
        one_statement = backend_of(self._c).one_statement_writes
        in_statement = one_statement and not check_first  # `_reserve_all` records the fence itself
        if fence is not None and not in_statement and not self.fence(order_id, fence, now):
            return Superseded()
        if check_first:
            settled = self._settled_reservation(order_id)
            if settled is not None:
                return settled
        elif one_statement:
            return self._reserve_first_delivery(order_id, items, now, fence)
        insert_together(self._c, [(stock_reservations, _reservation_rows(order_id, items, now))])
        taken: list[OrderItem] = []
        for item in sorted(items, key=lambda i: i.sku):
            decremented = precompiled.execute(
                self._c, _guarded_decrement(), {"b_sku": item.sku, "quantity": item.quantity, "now": now}
            ).rowcount
            if decremented != 1:
                return self._refuse(order_id, taken, self._why_not(item), now, fence)
            taken.append(item)
        return Reserved()

    def _reserve_first_delivery(
        self, order_id: str, items: Sequence[OrderItem], now: datetime, fence: Fence | None
    ) -> ReservationOutcome:
        """`reserve` without the check, on PostgreSQL: one statement (`_reserve_all`), the fence
        included. The items go in SKU order, so the reservation keys are inserted in the order
        `release` inserts them."""
        ordered = sorted(items, key=lambda i: i.sku)
        parameters: dict[str, Any] = {
            "order_id": order_id,
            "skus": [item.sku for item in ordered],
            "quantities": [item.quantity for item in ordered],
            "now": now,
        }
        if fence is None:
            rows = precompiled.execute(self._c, _reserve_all(), parameters, prepare=True).all()
        else:
            parameters.update(fence_event=fence.event_id, fence_claim=fence.claim)
            rows = precompiled.execute(self._c, _reserve_all(fenced=True), parameters, prepare=True).all()
            if not rows[0].fenced:
                return Superseded()
        levels = {row.sku: row.available for row in rows if row.sku is not None}
        taken_skus = {row.sku for row in rows if row.taken}
        missing = [item for item in ordered if item.sku not in taken_skus]
        if not missing:
            return Reserved()
        short, available = missing[0], levels.get(missing[0].sku)
        refusal = (
            unknown_sku(short.sku)
            if available is None
            else insufficient_stock(short.sku, short.quantity, available)
        )
        taken = [item for item in ordered if item.sku in taken_skus]
        return self._refuse(order_id, taken, refusal, now, fence)

    def _refuse(
        self, order_id: str, taken: Sequence[OrderItem], refusal: Rejected, now: datetime, fence: Fence | None
    ) -> Rejected:
        """`refusal`, after closing the order in this transaction when the step is fenced (see
        `reserve`): `taken` (what this transaction decremented) goes back, the order's ACTIVE
        rows are RELEASED and the reason is recorded. Unfenced, the caller rolls back instead."""
        if fence is None:
            return refusal
        given = {"order_id": order_id, "reason": refusal.reason, "now": now}
        if backend_of(self._c).one_statement_writes:
            given.update(g_skus=[item.sku for item in taken], g_quantities=[item.quantity for item in taken])
            precompiled.execute(self._c, _close_refused(), given, prepare=True)
            return refusal
        for item in taken:
            back = {"b_sku": item.sku, "quantity": item.quantity, "now": now}
            precompiled.execute(self._c, _give_back(), back)
        precompiled.execute(self._c, _release_booked(), given)
        precompiled.execute(self._c, _record_closed(), given)
        return refusal

    def reserve_many(
        self, requests: Sequence[ReservationRequest], now: datetime, check_first: bool = True
    ) -> dict[str, ReservationOutcome]:
        """Reserve for a batch of orders (each once in it); an outcome per order, in the batch's
        order. The caller commits whatever the outcomes (nothing is left to roll back). What
        follows is PostgreSQL's way; SQLite's takes the same steps (`_fenced_and_checked_embedded`,
        `_allocate_embedded`).

        Every order's fence goes in first (Superseded: nothing written for that order, the others
        go on). An order that reserved before gets `reserve`'s answer for it (a redelivery reserves
        nothing more). The others are allocated order by order in the batch's order, each all or
        none (`domain.allocation`), on the stock rows locked in SKU order, and written in one
        statement: ACTIVE reservations and the decrements of the reserved orders, and for each
        refused one, RELEASED rows and the reason, which close it as `release` would (the one-order
        saga closes a refused order in a transaction of its own).

        `check_first=False` skips reading earlier reservations, as `reserve` does for a first
        delivery: an order that has some makes the insert fail on its key (a ConflictError, and
        the caller tries the batch again with the check)."""
        if len({request.order_id for request in requests}) != len(requests):
            raise ValueError("an order appears twice in one batch")
        if backend_of(self._c).one_statement_writes:
            outcomes = self._fenced_and_checked(requests, now, check_first)
            allocate_and_write = self._allocate
        else:
            outcomes = self._fenced_and_checked_embedded(requests, now, check_first)
            allocate_and_write = self._allocate_embedded
        to_allocate = [r for r in requests if r.order_id not in outcomes]
        if to_allocate:
            outcomes.update(allocate_and_write(to_allocate, now))
        return {r.order_id: outcomes[r.order_id] for r in requests}

    def _fenced_and_checked(
        self, requests: Sequence[ReservationRequest], now: datetime, check_first: bool
    ) -> dict[str, ReservationOutcome]:
        """`reserve_many`'s first steps on PostgreSQL: every order's fence, then with `check_first`
        the earlier reservations of the orders it fenced; the outcomes these decide."""
        by_order = sorted(requests, key=lambda r: r.order_id)
        accepted = set(
            precompiled.execute(
                self._c,
                _fence_many(),
                {
                    "order_ids": [r.order_id for r in by_order],
                    "fence_events": [r.fence.event_id for r in by_order],
                    "fence_claims": [r.fence.claim for r in by_order],
                    "now": now,
                },
                prepare=True,
            ).scalars()
        )
        outcomes: dict[str, ReservationOutcome] = {
            r.order_id: Superseded() for r in requests if r.order_id not in accepted
        }
        if check_first and accepted:
            earlier = precompiled.execute(
                self._c, _earlier_reservations(), {"order_ids": sorted(accepted)}, prepare=True
            )
            for row in earlier:
                outcomes[row.order_id] = _earlier_outcome(row.active, row.closed_reason)
        return outcomes

    def _allocate(
        self, requests: Sequence[ReservationRequest], now: datetime
    ) -> dict[str, ReservationOutcome]:
        """`reserve_many`'s allocation of orders with no reservation yet, and its writes."""
        skus = sorted({item.sku for request in requests for item in request.items})
        levels = precompiled.execute(self._c, _locked_levels(), {"skus": skus}, prepare=True)
        allocation = allocate(requests, {row.sku: row.available for row in levels})
        booking: list[tuple[str, str, int, str]] = []
        closing: list[tuple[str, str]] = []
        for request in requests:
            outcome = allocation.outcomes[request.order_id]
            status = ACTIVE if isinstance(outcome, Reserved) else RELEASED
            booking += [(request.order_id, i.sku, i.quantity, status) for i in request.items]
            if isinstance(outcome, Rejected):
                closing.append((request.order_id, outcome.reason))
        totals = sorted(allocation.taken.items())
        parameters: dict[str, Any] = {"now": now}
        for names, rows in (
            (("r_orders", "r_skus", "r_quantities", "r_statuses"), booking),
            (("t_skus", "t_quantities"), totals),
            (("c_orders", "c_reasons"), closing),
        ):
            columns = list(zip(*rows, strict=True)) or [()] * len(names)
            parameters.update({name: list(column) for name, column in zip(names, columns, strict=True)})
        written = precompiled.execute(self._c, _apply_allocation(), parameters, prepare=True).one()
        if written.taken != len(totals):  # the rows were locked: only a bug gets here
            raise RuntimeError(f"the allocation took {written.taken} of {len(totals)} SKUs: rolled back")
        return dict(allocation.outcomes)

    def _fenced_and_checked_embedded(
        self, requests: Sequence[ReservationRequest], now: datetime, check_first: bool
    ) -> dict[str, ReservationOutcome]:
        """`_fenced_and_checked` on SQLite, whose writer holds the whole database from its BEGIN
        IMMEDIATE (no row locks to order, no other writer between the read and the writes): the
        orders' fences in one multi-row upsert, with `check_first` each order's earlier
        reservations (`_settled_reservation`)."""
        by_order = sorted(requests, key=lambda r: r.order_id)
        fences: dict[str, Any] = {"now": now}
        for n, request in enumerate(by_order):
            fences.update(
                {
                    f"f_order_{n}": request.order_id,
                    f"f_event_{n}": request.fence.event_id,
                    f"f_claim_{n}": request.fence.claim,
                }
            )
        statement = _fence_rows_statement(len(by_order))
        accepted = set(precompiled.execute(self._c, statement, fences).scalars())
        outcomes: dict[str, ReservationOutcome] = {}
        for request in by_order:
            if request.order_id not in accepted:
                outcomes[request.order_id] = Superseded()
            elif check_first:
                earlier = self._settled_reservation(request.order_id)
                if earlier is not None:
                    outcomes[request.order_id] = earlier
        return outcomes

    def _allocate_embedded(
        self, requests: Sequence[ReservationRequest], now: datetime
    ) -> dict[str, ReservationOutcome]:
        """`_allocate` on SQLite: the allocation on the levels read in this transaction, and its
        writes in a few statements where PostgreSQL takes arrays: the reservation rows in one
        INSERT (ACTIVE, RELEASED for a refused order), a guarded decrement per SKU in one
        executemany, and the reason of each refused order on its fence row, which closes it as
        `release` would."""
        skus = sorted({item.sku for request in requests for item in request.items})
        levels = self._c.execute(_levels_of(), {"skus": skus})
        allocation = allocate(requests, {row.sku: row.available for row in levels})
        booking: list[dict[str, Any]] = []
        for request in requests:
            refused = isinstance(allocation.outcomes[request.order_id], Rejected)
            items = sorted(request.items, key=lambda i: i.sku)
            booking += _reservation_rows(request.order_id, items, now, RELEASED if refused else ACTIVE)
        insert_together(self._c, [(stock_reservations, booking)])
        totals = sorted(allocation.taken.items())
        if totals:
            taken = self._c.execute(
                _guarded_decrement(),
                [{"b_sku": sku, "quantity": quantity, "now": now} for sku, quantity in totals],
            ).rowcount
            if taken != len(totals):  # the database was this writer's: only a bug gets here
                raise RuntimeError(f"the allocation took {taken} of {len(totals)} SKUs: rolled back")
        for request in requests:
            outcome = allocation.outcomes[request.order_id]
            if isinstance(outcome, Rejected):
                closing = {"order_id": request.order_id, "reason": outcome.reason}
                precompiled.execute(self._c, _record_closed(), closing)
        return dict(allocation.outcomes)

    def _settled_reservation(self, order_id: str) -> ReservationOutcome | None:
        """The outcome for an order that reserved before, or None if it never did."""
        status = self.reservation_status(order_id)
        if status is None:
            return None
        closed = None
        if status == RELEASED:
            closed = self._c.execute(
                select(reservation_fences.c.closed_reason).where(reservation_fences.c.order_id == order_id)
            ).scalar()
        return _earlier_outcome(status == ACTIVE, closed)

    def _why_not(self, item: OrderItem) -> Rejected:
        level = self.get(item.sku)
        if level is None:
            return unknown_sku(item.sku)
        return insufficient_stock(item.sku, item.quantity, level.available)

    def release(
        self,
        order_id: str,
        now: datetime,
        items: Sequence[OrderItem] = (),
        fence: Fence | None = None,
        reason: str = "",
    ) -> list[OrderItem] | Superseded:
        """Release the order's active reservations (none left is fine: release is idempotent) and
        close the order to later reservations; the items released. With a `fence`, Superseded
        (nothing written) if a newer step of the order wrote before; with a `reason` too, why the
        saga closed it, which a later `reserve` of the order answers with.

        Each of `items` without a reservation row gets a RELEASED one first: a saga step that lost
        its lease and still runs elsewhere then finds the order released instead of reserving for
        an order that is already settled. Inserting first matters on PostgreSQL: an insert that
        meets a concurrent, uncommitted reservation waits for it, so the update below sees it.
        """
        if fence is not None and not self.fence(order_id, fence, now):
            return Superseded()
        if fence is not None and reason:  # why it is closed, for a later step that finds it so
            precompiled.execute(self._c, _record_closed(), {"order_id": order_id, "reason": reason})
        if items:
            self._c.execute(
                backend_of(self._c).upsert(stock_reservations).on_conflict_do_nothing(),
                [
                    {
                        "order_id": order_id,
                        "sku": item.sku,
                        "quantity": item.quantity,
                        "status": RELEASED,
                        "create_time": now,
                        "update_time": now,
                    }
                    for item in sorted(items, key=lambda i: i.sku)
                ],
            )
        released = self._c.execute(
            update(stock_reservations)
            .where(stock_reservations.c.order_id == order_id, stock_reservations.c.status == ACTIVE)
            .values(status=RELEASED, update_time=now)
            .returning(stock_reservations.c.sku, stock_reservations.c.quantity)
        ).all()
        items = sorted((OrderItem(r.sku, r.quantity) for r in released), key=lambda i: i.sku)
        for item in items:
            self._c.execute(
                update(stock)
                .where(stock.c.sku == item.sku)
                .values(
                    available=stock.c.available + item.quantity,
                    reserved=stock.c.reserved - item.quantity,
                    version=stock.c.version + 1,
                    update_time=now,
                )
            )
        return items


class InventoryUnitOfWork(UnitOfWork):
    """A transaction on the inventory database: stock and reservations."""

    stock: StockRepository

    def _started(self) -> None:
        self.stock = StockRepository(self.session)


InventoryUowFactory = Callable[..., InventoryUnitOfWork]
