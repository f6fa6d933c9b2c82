"""The schema as SQLAlchemy Core tables: one MetaData per database (orders, inventory).

Core rather than the ORM: every write here is a single conditional statement (`... WHERE version =
:v`) whose row count is the optimistic-lock verdict, and the hot path stays free of identity-map
and flush overhead. Alembic migrations under `db/migrations/` create exactly these tables; a test
compares the two.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python; `timestamptz` on PostgreSQL, naive UTC text on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite makes only INTEGER PRIMARY KEY an auto-increment rowid.
BigId: Any = BigInteger().with_variant(Integer(), "sqlite")

orders_metadata = MetaData(naming_convention=NAMING)
inventory_metadata = MetaData(naming_convention=NAMING)

orders = Table(
    "orders",
    orders_metadata,
    Column("id", String(36), primary_key=True),
    Column("customer_id", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("failure_reason", Text, nullable=False, server_default=text("''")),
    Column("version", BigInteger, nullable=False),
    Column("request_id", String(128), nullable=True, unique=True),
    Column("request_fingerprint", String(64), nullable=True),
    Column("create_time", UTCDateTime, nullable=False),
    Column("update_time", UTCDateTime, nullable=False),
    Index(None, "customer_id", "create_time", "id"),
    Index(None, "status", "create_time", "id"),
    Index(None, "create_time", "id"),
)

order_items = Table(
    "order_items",
    orders_metadata,
    Column("order_id", String(36), ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("sku", String(64), nullable=False),
    Column("quantity", Integer, nullable=False),
)

outbox_events = Table(
    "outbox_events",
    orders_metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("aggregate_id", String(36), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("headers", Text, nullable=False),
    Column("status", String(8), nullable=False),
    # Counted when a claim takes the event (a process that dies running it has used an attempt);
    # a deferral gives its attempt back.
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    # Every claim's number, never reset: (id, claims) is the fencing token the inventory keeps
    # per order (see `reservation_fences`), so a step of an older claim writes nothing there.
    Column("claims", Integer, nullable=False, server_default=text("0")),
    Column("available_at", UTCDateTime, nullable=False),
    Column("locked_until", UTCDateTime, nullable=True),
    Column("lease_token", String(36), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # The claim query walks PENDING rows oldest first; DONE and DEAD rows stay out of this index.
    Index(
        "ix_outbox_events_pending",
        "id",
        postgresql_where=text("status = 'PENDING'"),
        sqlite_where=text("status = 'PENDING'"),
    ),
    Index(None, "aggregate_id", "id"),
    Index(None, "status", "updated_at"),
)

# Changes of orders waiting to be published to the message broker (`--events-url`, the event
# relay: db.relay, db.recording). Written only while the relay is on, in the transaction of the
# change. A queue of its own, claimed like the outbox but one event of an order at a time, in
# version order; (order_id, version) is the event.
relay_events = Table(
    "relay_events",
    orders_metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("order_id", String(36), nullable=False),
    Column("kind", String(16), nullable=False),  # placed, validated, failed, cancelled, expired
    Column("version", BigInteger, nullable=False),  # the order's version after the change
    Column("customer_id", String(128), nullable=False),
    Column("order_status", String(16), nullable=False),
    Column("failure_reason", Text, nullable=False, server_default=text("''")),
    Column("occurred_at", UTCDateTime, nullable=False),  # the order's update_time after the change
    Column("placed_items", Text, nullable=False, server_default=text("''")),  # JSON, placed only
    Column("headers", Text, nullable=False),
    Column("status", String(8), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("claims", Integer, nullable=False, server_default=text("0")),
    Column("available_at", UTCDateTime, nullable=False),
    Column("locked_until", UTCDateTime, nullable=True),
    Column("lease_token", String(36), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # One event per change: a version is recorded once, and an order's events are claimed in it.
    UniqueConstraint("order_id", "version"),
    Index(
        "ix_relay_events_pending",
        "id",
        postgresql_where=text("status = 'PENDING'"),
        sqlite_where=text("status = 'PENDING'"),
    ),
    Index(None, "status", "updated_at"),
)

stock = Table(
    "stock",
    inventory_metadata,
    Column("sku", String(64), primary_key=True),
    Column("available", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False, server_default=text("0")),
    Column("version", BigInteger, nullable=False),
    Column("update_time", UTCDateTime, nullable=False),
    # The last line of defence against oversell: the database itself refuses a negative count.
    CheckConstraint("available >= 0", name="available_not_negative"),
    CheckConstraint("reserved >= 0", name="reserved_not_negative"),
)

stock_reservations = Table(
    "stock_reservations",
    inventory_metadata,
    Column("order_id", String(36), primary_key=True),
    Column("sku", String(64), primary_key=True),
    Column("quantity", Integer, nullable=False),
    Column("status", String(8), nullable=False),
    Column("create_time", UTCDateTime, nullable=False),
    Column("update_time", UTCDateTime, nullable=False),
    Index(None, "sku", "status"),
)

# The newest saga step that wrote for an order: the (outbox event id, claim number) of its lease.
# A step of an older claim, or of an earlier event of the order, is refused (`StockRepository.fence`):
# a step that outlived its lease changes nothing in the inventory, whatever its database.
reservation_fences = Table(
    "reservation_fences",
    inventory_metadata,
    Column("order_id", String(36), primary_key=True),
    Column("event_id", BigInteger, nullable=False),
    Column("claim", Integer, nullable=False),
    # Why the saga closed the order in the inventory (a refusal, giving up): a later step that finds
    # the order closed fails it for that reason, not for "already released".
    Column("closed_reason", Text, nullable=True),
    Column("update_time", UTCDateTime, nullable=False),
)
