"""The Order aggregate's state machine: which moves are allowed, versions, and the events raised."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import InvalidTransitionError, PreconditionError
from domain.events import OrderCancelled, OrderPlaced
from domain.model import TRANSITIONS, Order, OrderItem, OrderStatus, Settlement, can_move

PENDING, VALIDATED, FAILED, CANCELLED = (
    OrderStatus.PENDING,
    OrderStatus.VALIDATED,
    OrderStatus.FAILED,
    OrderStatus.CANCELLED,
)
ALLOWED = {(PENDING, VALIDATED), (PENDING, FAILED), (PENDING, CANCELLED), (VALIDATED, CANCELLED)}
ALL_PAIRS = list(itertools.product(OrderStatus, OrderStatus))

PLACED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LATER = PLACED_AT + timedelta(minutes=5)
ITEMS = (OrderItem("SKU-1", 2), OrderItem("sku.2", 1))


def _placed() -> Order:
    order, _ = Order.place("customer-1", ITEMS, request_id="req-1", now=PLACED_AT)
    return order


def _order_in(status: OrderStatus) -> Order:
    """An order brought to `status` through the public moves only."""
    order = _placed()
    if status is VALIDATED:
        order = order.settle(Settlement.validated(), now=PLACED_AT)
    elif status is FAILED:
        order = order.settle(Settlement.failed("unknown SKU 'SKU-1'"), now=PLACED_AT)
    elif status is CANCELLED:
        order, _ = order.cancel(now=PLACED_AT)
    assert order.status is status
    return order


# Every target a client or the saga can ask for, by the method that asks for it. No method moves an
# order back to PENDING, which is the point: the table must not allow it either.
MOVES: dict[OrderStatus, Callable[[Order], Order]] = {
    VALIDATED: lambda order: order.settle(Settlement.validated(), now=LATER),
    FAILED: lambda order: order.settle(Settlement.failed("out of stock"), now=LATER),
    CANCELLED: lambda order: order.cancel(now=LATER)[0],
}


@pytest.mark.parametrize(("source", "target"), ALL_PAIRS, ids=lambda s: s.value)
def test_transition_table_allows_exactly_the_documented_moves(
    source: OrderStatus, target: OrderStatus
) -> None:
    assert can_move(source, target) is ((source, target) in ALLOWED)


def test_transition_table_covers_every_status() -> None:
    assert set(TRANSITIONS) == set(OrderStatus)


@pytest.mark.parametrize("source", list(OrderStatus), ids=lambda s: s.value)
def test_no_status_leads_back_to_pending(source: OrderStatus) -> None:
    assert not can_move(source, PENDING)


@pytest.mark.parametrize(
    ("source", "target"), [pair for pair in ALL_PAIRS if pair[1] in MOVES], ids=lambda s: s.value
)
def test_each_move_succeeds_or_raises_invalid_transition(source: OrderStatus, target: OrderStatus) -> None:
    order = _order_in(source)
    if (source, target) in ALLOWED:
        moved = MOVES[target](order)
        assert moved.status is target
        assert moved.version == order.version + 1
        assert moved.update_time == LATER
        assert moved.create_time == order.create_time
    else:
        with pytest.raises(InvalidTransitionError) as raised:
            MOVES[target](order)
        assert source.value in str(raised.value)
        assert target.value in str(raised.value)


def test_refused_move_leaves_the_order_unchanged() -> None:
    order = _order_in(FAILED)
    with pytest.raises(InvalidTransitionError):
        order.cancel(now=LATER)
    assert order.status is FAILED
    assert order.version == 2


def test_invalid_transition_is_a_precondition_error() -> None:
    assert issubclass(InvalidTransitionError, PreconditionError)


def test_cancelled_order_cannot_be_cancelled_again() -> None:
    with pytest.raises(InvalidTransitionError):
        _order_in(CANCELLED).cancel()


def test_failed_order_cannot_be_cancelled() -> None:
    with pytest.raises(InvalidTransitionError):
        _order_in(FAILED).cancel()


def test_validated_order_can_be_cancelled() -> None:
    cancelled, _ = _order_in(VALIDATED).cancel(now=LATER)
    assert cancelled.status is CANCELLED


def test_validated_order_cannot_fail_afterwards() -> None:
    with pytest.raises(InvalidTransitionError):
        _order_in(VALIDATED).settle(Settlement.failed("late failure"))


def test_placed_order_is_pending_at_version_one() -> None:
    order, _ = Order.place("customer-1", ITEMS, request_id="req-1", now=PLACED_AT)
    assert order.status is PENDING
    assert order.version == 1
    assert order.create_time == order.update_time == PLACED_AT
    assert order.failure_reason == ""
    assert order.customer_id == "customer-1"
    assert order.items == ITEMS
    assert order.request_id == "req-1"


def test_placed_order_gets_a_fresh_uuid() -> None:
    first, second = _placed(), _placed()
    assert str(uuid.UUID(first.order_id)) == first.order_id
    assert first.order_id != second.order_id


def test_version_grows_by_one_on_every_change() -> None:
    placed = _placed()
    validated = placed.settle(Settlement.validated(), now=LATER)
    cancelled, _ = validated.cancel(now=LATER)
    assert [placed.version, validated.version, cancelled.version] == [1, 2, 3]


def test_placing_raises_order_placed_with_the_whole_order_in_its_payload() -> None:
    order, event = Order.place("customer-1", ITEMS, now=PLACED_AT)
    assert isinstance(event, OrderPlaced)
    assert event.event_type == "ORDER_CREATED"
    assert event.order_id == order.order_id
    assert event.payload() == {
        "order_id": order.order_id,
        "customer_id": "customer-1",
        "items": [{"sku": "SKU-1", "quantity": 2}, {"sku": "sku.2", "quantity": 1}],
    }


@pytest.mark.parametrize("source", [PENDING, VALIDATED], ids=lambda s: s.value)
def test_cancelling_raises_order_cancelled(source: OrderStatus) -> None:
    order = _order_in(source)
    _, event = order.cancel(now=LATER)
    assert event == OrderCancelled(order_id=order.order_id)
    assert event.event_type == "ORDER_CANCELLED"
    assert event.payload() == {"order_id": order.order_id}


def test_failing_records_the_reason() -> None:
    failed = _placed().settle(Settlement.failed("unknown SKU 'X'"), now=LATER)
    assert failed.failure_reason == "unknown SKU 'X'"


@pytest.mark.parametrize("target", [VALIDATED, CANCELLED], ids=lambda s: s.value)
def test_only_a_failed_order_has_a_failure_reason(target: OrderStatus) -> None:
    assert MOVES[target](_placed()).failure_reason == ""


def test_move_without_an_explicit_time_uses_the_current_utc_time() -> None:
    before = datetime.now(UTC)
    moved = _placed().settle(Settlement.validated())
    assert before <= moved.update_time <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("status", "settled"),
    [(PENDING, False), (VALIDATED, True), (FAILED, True), (CANCELLED, True)],
    ids=lambda s: getattr(s, "value", str(s)),
)
def test_only_pending_is_unsettled(status: OrderStatus, settled: bool) -> None:
    assert status.is_settled is settled


@given(st.lists(st.sampled_from(sorted(MOVES, key=lambda s: s.value)), max_size=8))
def test_any_sequence_of_moves_follows_the_table_and_counts_versions(targets: list[OrderStatus]) -> None:
    order = _placed()
    changes = 0
    for target in targets:
        allowed = can_move(order.status, target)
        try:
            order = MOVES[target](order)
        except InvalidTransitionError:
            assert not allowed
        else:
            assert allowed
            changes += 1
    assert order.version == 1 + changes


@pytest.mark.parametrize(
    ("status", "reason", "error"),
    [
        (VALIDATED, "", None),
        (FAILED, "out of stock", None),
        (FAILED, "", ValueError),  # a failure says why
        (VALIDATED, "why?", ValueError),  # and only a failure does
        (CANCELLED, "", InvalidTransitionError),  # a client cancels, never the saga
        (PENDING, "", InvalidTransitionError),
    ],
)
def test_the_state_machine_decides_each_settlement_before_any_write(
    status: OrderStatus, reason: str, error: type[Exception] | None
) -> None:
    if error is None:
        assert Settlement(status, reason).status is status
    else:
        with pytest.raises(error):
            Settlement(status, reason)
