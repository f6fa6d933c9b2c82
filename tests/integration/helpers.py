"""What the integration tests look at: rows in the database and statuses on the wire."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from orders_service_api.v1 import orders_pb2 as pb
from sqlalchemy import Engine, Table, func, select

from db.tables import order_items, orders, outbox_events
from tests.local_services import pg_connect as pg_connect  # shared with the benchmark

if TYPE_CHECKING:
    from tests.conftest import InProcessServer

# What no client may ever read in an error message: stack traces, SQL, driver or ORM names.
_INTERNALS = re.compile(
    r"Traceback|File \"|\[SQL|\bSELECT\b.*\bFROM\b|\bINSERT INTO\b|\bUPDATE \w+ SET\b|\bDELETE FROM\b|"
    r"(?i:sqlalchemy|psycopg|sqlite3|OperationalError|IntegrityError|ProgrammingError|pgcode|SQLSTATE)",
)


class Rows:
    """Reads the orders database behind a server, as an operator would."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def count(self, table: Table, **where: Any) -> int:
        query = select(func.count()).select_from(table)
        for column, value in where.items():
            query = query.where(table.c[column] == value)
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def order(self, order_id: str) -> Any:
        with self.engine.connect() as connection:
            return connection.execute(select(orders).where(orders.c.id == order_id)).one_or_none()

    def items(self, order_id: str) -> list[tuple[str, int]]:
        query = (
            select(order_items.c.sku, order_items.c.quantity)
            .where(order_items.c.order_id == order_id)
            .order_by(order_items.c.position)
        )
        with self.engine.connect() as connection:
            return [(row.sku, row.quantity) for row in connection.execute(query)]

    def events(self, order_id: str, event_type: str | None = None) -> list[Any]:
        query = select(outbox_events).where(outbox_events.c.aggregate_id == order_id)
        if event_type is not None:
            query = query.where(outbox_events.c.event_type == event_type)
        with self.engine.connect() as connection:
            return list(connection.execute(query.order_by(outbox_events.c.id)))

    def totals(self) -> tuple[int, int, int]:
        """(orders, order items, outbox events): what a write would change."""
        return self.count(orders), self.count(order_items), self.count(outbox_events)


def rows_of(server: InProcessServer) -> Rows:
    return Rows(server.service.engines.orders)


def headers(event: Any) -> dict[str, str]:
    return dict(json.loads(event.headers))


def place_request(
    customer: str = "c1", items: Sequence[tuple[str, int]] = (("SKU-1", 1),), **fields: Any
) -> pb.PlaceOrderRequest:
    return pb.PlaceOrderRequest(
        customer_id=customer, items=[pb.OrderItem(sku=sku, quantity=q) for sku, q in items], **fields
    )


def assert_no_internals(message: str | None) -> None:
    assert message is not None
    assert not _INTERNALS.search(message), f"error message leaks internals: {message!r}"


def rpc_error(call: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The error a unary call (or the first read of a stream) ends with; fails the test if it succeeds.

    Every error passes through `assert_no_internals`: no message may show SQL or a stack trace."""
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            next(result)
    except grpc.RpcError as error:
        assert_no_internals(error.details())
        return error
    raise AssertionError(f"expected the call to fail, it returned {result!r}")


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """google.rpc.BadRequest field violations from the rich status details: field -> description."""
    status = rpc_status.from_call(error)
    assert status is not None, "no rich status in the trailers"
    assert status.code == error.code().value[0]
    violations: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                violations[violation.field] = violation.description
    return violations


def health_status(server: InProcessServer, service: str = "") -> str:
    """The health service's answer for `service`, by name (SERVING, NOT_SERVING, ...)."""
    stub = health_pb2_grpc.HealthStub(server.channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
