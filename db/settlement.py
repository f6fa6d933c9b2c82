"""The saga's writes in the orders database as one statement each, on PostgreSQL: an order's
settlement together with its event's completion, fenced on the lease, for one event or a batch
(`db.unit_of_work.OrdersUnitOfWork` runs them)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    String,
    Text,
    and_,
    bindparam,
    exists,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql

from db.orders import settle_pending_statement, settling
from db.outbox import PENDING, done_values
from db.tables import orders, outbox_events


@lru_cache(maxsize=1)
def settle_and_complete_statement() -> Select[Any]:
    """`settle_and_complete` on PostgreSQL: WITH settled AS (the settle, RETURNING id), completed
    AS (the fenced completion of the event, only if the order settled, RETURNING id) SELECT both
    counts. One statement, so one round trip and one execution of SQLAlchemy's per-call work."""
    settled = settle_pending_statement().returning(orders.c.id).cte("settled")
    event_id, token = bindparam("event_id", type_=BigInteger), bindparam("token", type_=String)
    completed = _completion(event_id, token, exists(select(settled.c.id)))
    return select(
        select(func.count()).select_from(settled).scalar_subquery().label("settled"),
        select(func.count()).select_from(completed).scalar_subquery().label("completed"),
    )


@lru_cache(maxsize=1)
def settle_and_complete_many_statement() -> Select[Any]:
    """`settle_and_complete_many` on PostgreSQL:

        WITH wanted    AS (SELECT * FROM unnest(:s_orders, :s_targets, :s_reasons, :s_events, :s_tokens)),
             leased    AS (SELECT id FROM outbox_events JOIN wanted ON (id, lease_token)
                           WHERE status = 'PENDING' ORDER BY id FOR UPDATE),
             settled   AS (UPDATE orders ... FROM wanted WHERE status = 'PENDING'
                           AND the order's event is leased RETURNING id),
             completed AS (UPDATE outbox_events ... FROM wanted WHERE (id, lease_token) match
                           AND the event's order settled RETURNING id)
        SELECT array_agg(leased), array_agg(settled), array_agg(completed)

    `leased` locks the events whose lease still holds, in id order (as a renewal's or another
    batch's statement would take them): none of them can pass to another claim before this commit,
    so an order settles only with its event's completion, and no other order of the batch has to
    be rolled back for one whose lease was lost."""
    wanted = select(
        func.unnest(
            bindparam("s_orders", type_=postgresql.ARRAY(String)),
            bindparam("s_targets", type_=postgresql.ARRAY(String)),
            bindparam("s_reasons", type_=postgresql.ARRAY(Text)),
            bindparam("s_events", type_=postgresql.ARRAY(BigInteger)),
            bindparam("s_tokens", type_=postgresql.ARRAY(String)),
        )
        .table_valued("order_id", "target", "reason", "event_id", "token")
        .render_derived("w")
    ).cte("wanted")
    leased = (
        select(outbox_events.c.id)
        .join(
            wanted,
            and_(wanted.c.event_id == outbox_events.c.id, wanted.c.token == outbox_events.c.lease_token),
        )
        .where(outbox_events.c.status == PENDING)
        .order_by(outbox_events.c.id)
        .with_for_update(of=outbox_events)
        .cte("leased")
    )
    settled = (
        settling(wanted.c.order_id, wanted.c.target, wanted.c.reason)
        .where(wanted.c.event_id.in_(select(leased.c.id)))
        .returning(orders.c.id)
        .cte("settled")
    )
    completed = _completion(wanted.c.event_id, wanted.c.token, wanted.c.order_id.in_(select(settled.c.id)))
    return select(
        *(
            select(func.array_agg(part.c.id)).scalar_subquery().label(name)
            for name, part in (("leased", leased), ("settled", settled), ("completed", completed))
        )
    )


def _completion(event_id: Any, token: Any, settled: ColumnElement[bool]) -> Any:
    """The event marked DONE, fenced on its lease token and only where its order `settled`: a CTE
    RETURNING its id."""
    return (
        update(outbox_events)
        .where(
            outbox_events.c.id == event_id,
            outbox_events.c.lease_token == token,
            outbox_events.c.status == PENDING,
            settled,
        )
        .values(done_values())
        .returning(outbox_events.c.id)
        .cte("completed")
    )
