"""The set-based saga's allocation (domain.allocation), as tables: order by order in the batch's
order, each order all or none, each on what the earlier ones left; a hot SKU goes first come,
first served and is never oversold, exactly as the same orders reserved one after another."""

from __future__ import annotations

import random

import pytest

from domain.allocation import ReservationRequest, allocate
from domain.fencing import Fence
from domain.inventory import Rejected, Reserved, insufficient_stock, unknown_sku
from domain.model import OrderItem


def batch(*orders: list[tuple[str, int]]) -> list[ReservationRequest]:
    """Requests named o1, o2, ... in the order given, fenced by events 1, 2, ..."""
    return [
        ReservationRequest(f"o{n}", tuple(OrderItem(sku, quantity) for sku, quantity in items), Fence(n, 1))
        for n, items in enumerate(orders, start=1)
    ]


CASES = [
    pytest.param(
        {"A": 5},
        batch([("A", 2)], [("A", 3)], [("A", 1)]),
        {"o1": Reserved(), "o2": Reserved(), "o3": insufficient_stock("A", 1, 0)},
        {"A": 5},
        id="a-hot-sku-goes-in-event-order-until-it-runs-out",
    ),
    pytest.param(
        {"A": 5},
        batch([("A", 4)], [("A", 2)], [("A", 1)]),
        {"o1": Reserved(), "o2": insufficient_stock("A", 2, 1), "o3": Reserved()},
        {"A": 5},
        id="a-later-smaller-order-still-gets-what-an-earlier-one-left",
    ),
    pytest.param(
        {"A": 5, "B": 1},
        batch([("A", 3), ("B", 2)], [("A", 3)]),
        {"o1": insufficient_stock("B", 2, 1), "o2": Reserved()},
        {"A": 3},
        id="an-order-short-of-one-sku-takes-nothing-of-the-others",
    ),
    pytest.param(
        {"A": 1, "B": 1, "C": 0},
        batch([("C", 1), ("B", 2), ("A", 1)]),
        {"o1": insufficient_stock("B", 2, 1)},
        {},
        id="the-first-short-sku-in-sku-order-is-named",
    ),
    pytest.param(
        {"A": 5},
        batch([("A", 1), ("GHOST", 1)], [("A", 5)]),
        {"o1": unknown_sku("GHOST"), "o2": Reserved()},
        {"A": 5},
        id="an-unknown-sku-refuses-its-order-only",
    ),
    pytest.param(
        {"A": 2, "B": 2},
        batch([("A", 1), ("B", 1)], [("B", 1), ("A", 1)], [("A", 1), ("B", 1)]),
        {"o1": Reserved(), "o2": Reserved(), "o3": insufficient_stock("A", 1, 0)},
        {"A": 2, "B": 2},
        id="two-skus-listed-either-way",
    ),
    pytest.param({"A": 0}, batch([("A", 1)]), {"o1": insufficient_stock("A", 1, 0)}, {}, id="none-left"),
]


@pytest.mark.parametrize(("levels", "requests", "outcomes", "taken"), CASES)
def test_allocation_table(levels, requests, outcomes, taken):
    allocation = allocate(requests, levels)

    assert allocation.outcomes == outcomes
    assert list(allocation.outcomes) == [r.order_id for r in requests], "outcomes in the batch's order"
    assert allocation.taken == taken


def one_after_another(requests: list[ReservationRequest], levels: dict[str, int]) -> dict[str, object]:
    """The same orders reserved one by one, as the one-order saga does: each a batch of its own."""
    left = dict(levels)
    outcomes: dict[str, object] = {}
    for request in requests:
        alone = allocate([request], left)
        outcomes[request.order_id] = alone.outcomes[request.order_id]
        for sku, quantity in alone.taken.items():
            left[sku] -= quantity
    return outcomes


@pytest.mark.parametrize("seed", range(20))
def test_a_batch_allocates_exactly_as_the_same_orders_one_after_another_and_never_oversells(seed):
    rng = random.Random(seed)
    skus = ["HOT", "B", "C"]
    levels = {"HOT": rng.randint(0, 10), "B": rng.randint(0, 10), "C": rng.randint(0, 10)}
    requests = batch(
        *(
            [(sku, rng.randint(1, 4)) for sku in rng.sample(skus, rng.randint(1, 3))]
            for _ in range(rng.randint(2, 30))
        )
    )

    allocation = allocate(requests, levels)

    assert allocation.outcomes == one_after_another(requests, levels)
    for sku, start in levels.items():
        assert 0 <= allocation.taken.get(sku, 0) <= start, f"{sku} oversold"
    assert all(isinstance(outcome, Reserved | Rejected) for outcome in allocation.outcomes.values())
    expected: dict[str, int] = {}
    for request in requests:
        if allocation.outcomes[request.order_id] == Reserved():
            for item in request.items:
                expected[item.sku] = expected.get(item.sku, 0) + item.quantity
    assert allocation.taken == expected, "the totals are exactly the reserved orders' items"
