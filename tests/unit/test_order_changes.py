"""OrderChanges: a listener hears its own order's changes, not others', and the close; orders
nobody listens to leave nothing behind."""

from __future__ import annotations

from functools import partial

from saga.signals import OrderChanges


def test_a_change_of_the_order_calls_its_listeners_and_no_others() -> None:
    changes = OrderChanges()
    heard: list[str] = []
    changes.subscribe("order-a", lambda: heard.append("a1"))
    changes.subscribe("order-a", lambda: heard.append("a2"))
    changes.subscribe("order-b", lambda: heard.append("b"))

    changes.publish(["order-a"])

    assert heard == ["a1", "a2"]


def test_an_unsubscribed_listener_hears_nothing_more_and_the_order_is_forgotten() -> None:
    changes = OrderChanges()
    heard: list[int] = []
    unsubscribe = changes.subscribe("order-a", lambda: heard.append(1))
    changes.publish(["order-a"])
    unsubscribe()
    unsubscribe()  # twice is harmless

    changes.publish(["order-a"])

    assert heard == [1]
    assert changes.watched == 0


def test_close_calls_every_listener_and_later_subscribers_at_once() -> None:
    changes = OrderChanges()
    heard: list[str] = []
    for n in range(3):
        changes.subscribe(f"order-{n}", partial(heard.append, f"order-{n}"))

    changes.close()
    changes.subscribe("order-late", lambda: heard.append("late"))

    assert sorted(heard) == ["late", "order-0", "order-1", "order-2"]
    assert changes.closed


def test_orders_nobody_listens_to_leave_nothing_behind() -> None:
    changes = OrderChanges()
    changes.publish([f"order-{n}" for n in range(1000)])
    assert changes.watched == 0
    first = changes.subscribe("order-1", lambda: None)
    second = changes.subscribe("order-1", lambda: None)
    assert changes.watched == 1
    first()
    second()
    assert changes.watched == 0  # the last listener took the entry with it
