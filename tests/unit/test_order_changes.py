"""OrderChanges: a watcher wakes for its own order's change, not for others', and at close; orders
nobody watches leave no counter behind."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from saga.signals import OrderChanges


def _wait_in_thread(
    changes: OrderChanges, order_id: str, since: int, timeout: float
) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(changes.wait(order_id, since, timeout)))
    thread.start()
    return thread, result


def test_a_change_of_the_watched_order_ends_the_wait() -> None:
    changes = OrderChanges()
    with changes.watching("order-a"):
        thread, result = _wait_in_thread(changes, "order-a", 0, timeout=30)
        changes.publish(["order-a"])  # before or during the wait: either way the counter moved past 0
        thread.join(10)
    assert result == [1]


def test_a_change_of_another_order_does_not_end_the_wait() -> None:
    changes = OrderChanges()
    with changes.watching("order-a"), changes.watching("order-b"):
        changes.publish(["order-b"])
        began = time.monotonic()
        assert changes.wait("order-a", 0, timeout=0.2) == 0  # only the timeout ended it
        assert time.monotonic() - began >= 0.2
        assert changes.generation("order-b") == 1


def test_two_watchers_of_one_order_both_wake() -> None:
    changes = OrderChanges()
    with changes.watching("order-a"), changes.watching("order-a"):
        first, first_result = _wait_in_thread(changes, "order-a", 0, timeout=30)
        second, second_result = _wait_in_thread(changes, "order-a", 0, timeout=30)
        changes.publish(["order-a", "order-a"])
        first.join(10)
        second.join(10)
    assert first_result == second_result == [2]


def test_close_ends_every_wait() -> None:
    changes = OrderChanges()
    with contextlib.ExitStack() as watches:
        for n in range(3):
            watches.enter_context(changes.watching(f"order-{n}"))
        threads = [_wait_in_thread(changes, f"order-{n}", 0, timeout=30) for n in range(3)]
        changes.close()
        for thread, result in threads:
            thread.join(10)
            assert result == [0]
    assert changes.closed


def test_orders_nobody_watches_leave_no_counter() -> None:
    changes = OrderChanges()
    changes.publish([f"order-{n}" for n in range(1000)])
    assert changes.watched == 0
    assert changes.generation("order-1") == 0
    with changes.watching("order-1"), changes.watching("order-1"):
        changes.publish(["order-1"])
        assert (changes.watched, changes.generation("order-1")) == (1, 1)
    assert changes.watched == 0  # the last watcher took the counter with it


def test_waiting_on_an_order_not_watched_is_a_mistake() -> None:
    with pytest.raises(RuntimeError, match="not being watched"):
        OrderChanges().wait("order-a", 0, timeout=0.1)
