"""A redelivered ORDER_CREATED must find the order's reservation, whatever the stock is by then.

The first delivery skips reading earlier reservations (StockRepository.reserve); these cases are
why that is safe: an order that already holds its stock is not rejected when the SKU has run
out meanwhile (which would make the saga release a VALIDATED order's stock), and is not reserved
twice when there is stock left.
"""

from __future__ import annotations

from functools import partial

from sqlalchemy import Engine, func, select

from db.inventory import InventoryUnitOfWork
from db.tables import stock_reservations
from domain.inventory import Rejected, Reserved
from domain.model import OrderItem, utcnow
from saga.inventory import InventoryParticipant

ITEMS = (OrderItem("SKU-HOT", 1),)


def stock_of(engine: Engine, sku: str) -> tuple[int, int]:
    with InventoryUnitOfWork(engine, write=False) as uow:
        level = uow.stock.get(sku)
    assert level is not None
    return level.available, level.reserved


def set_stock(engine: Engine, sku: str, available: int) -> None:
    with InventoryUnitOfWork(engine) as uow:
        uow.stock.set_available(sku, available, utcnow())
        uow.commit()


def reservation_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(stock_reservations)).scalar_one())


def test_a_redelivery_after_the_sku_ran_out_is_still_reserved(engine):
    participant = InventoryParticipant(partial(InventoryUnitOfWork, engine))
    set_stock(engine, "SKU-HOT", 1)
    assert participant.reserve("order-a", ITEMS) == Reserved(fresh=True)
    assert stock_of(engine, "SKU-HOT") == (0, 1)

    again = participant.reserve("order-a", ITEMS)

    assert again == Reserved(fresh=False)
    assert stock_of(engine, "SKU-HOT") == (0, 1)
    assert reservation_rows(engine) == 1


def test_a_redelivery_with_stock_left_reserves_nothing_more(engine):
    participant = InventoryParticipant(partial(InventoryUnitOfWork, engine))
    set_stock(engine, "SKU-HOT", 5)
    assert participant.reserve("order-a", ITEMS) == Reserved(fresh=True)

    again = participant.reserve("order-a", ITEMS)

    assert again == Reserved(fresh=False)
    assert stock_of(engine, "SKU-HOT") == (4, 1), "the duplicate's decrement was rolled back"
    assert participant.conflict_retries == 1, "the key conflict sent it down the checked path"


def test_a_released_order_stays_closed_with_or_without_stock(engine):
    participant = InventoryParticipant(partial(InventoryUnitOfWork, engine))
    set_stock(engine, "SKU-HOT", 5)
    participant.release("order-a", ITEMS)  # closed before it ever reserved (a cancel won)

    outcome = participant.reserve("order-a", ITEMS)

    assert isinstance(outcome, Rejected) and "already released" in outcome.reason
    assert stock_of(engine, "SKU-HOT") == (5, 0)
    set_stock(engine, "SKU-HOT", 0)
    outcome = participant.reserve("order-a", ITEMS)
    assert isinstance(outcome, Rejected) and "already released" in outcome.reason
