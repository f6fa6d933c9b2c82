"""Helpers of the saga suites: waiting for orders to settle over gRPC, fault files, invariants."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orders_service_api.v1 import orders_pb2 as pb

from tests.invariants import Summary, check_invariants, settled
from tests.support import Stubs, wait_until

if TYPE_CHECKING:
    from tests.conftest import InProcessServer

SETTLED = (pb.ORDER_STATUS_VALIDATED, pb.ORDER_STATUS_FAILED, pb.ORDER_STATUS_CANCELLED)


def status_name(status: int) -> str:
    return str(pb.OrderStatus.Name(status))


def wait_for_status(
    stubs: Stubs, order_id: str, wanted: Iterable[int] = SETTLED, timeout: float = 15.0
) -> pb.Order:
    """The order once its status is one of `wanted` (by default: settled)."""
    wanted = tuple(wanted)

    def reached() -> pb.Order | None:
        order = stubs.get(order_id)
        return order if order.status in wanted else None

    return wait_until(reached, timeout, interval=0.02, what=f"order {order_id} to be {wanted}")


def stock_of(stubs: Stubs, sku: str) -> tuple[int, int]:
    level = stubs.stock(sku)
    return level.available, level.reserved


def write_faults(path: Path, **switches: Any) -> None:
    """Set the fault switches a server started with `fault_file=str(path)` reads at run time."""
    path.write_text(json.dumps(switches))


def wait_settled_and_check(
    server: InProcessServer, initial_stock: dict[str, int], timeout: float = 20.0
) -> Summary:
    """Wait until no order and no outbox event is PENDING, then assert the invariants."""
    engines = server.service.engines
    wait_until(
        lambda: settled(engines.orders), timeout, interval=0.05, what="every order and event to settle"
    )
    return check_invariants(engines.orders, engines.inventory, initial_stock)
