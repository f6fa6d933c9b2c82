"""ListOrders: filters, newest first, and opaque page tokens that visit every order exactly once."""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from orders_service_api.v1 import orders_pb2 as pb

from application.paging import PageTokenCodec
from db.unit_of_work import OrdersUnitOfWork
from domain.model import Order, OrderItem
from server.config import Settings
from tests.integration.helpers import field_violations, rpc_error


def list_page(server, **fields) -> pb.ListOrdersResponse:
    return server.stubs.orders.ListOrders(pb.ListOrdersRequest(**fields), timeout=10)


def list_all(server, **fields) -> tuple[list[pb.Order], list[int]]:
    """Every page of a query: the orders in the order received, and the size of each page."""
    orders: list[pb.Order] = []
    sizes: list[int] = []
    token = ""
    while True:
        page = list_page(server, page_token=token, **fields)
        orders += page.orders
        sizes.append(len(page.orders))
        token = page.next_page_token
        if not token:
            return orders, sizes


def newest_first(orders: list[pb.Order]) -> list[str]:
    ordered = sorted(orders, key=lambda o: (o.create_time.ToDatetime(), o.order_id), reverse=True)
    return [o.order_id for o in ordered]


def seed(server, count: int, customer: str, same_time: int = 1) -> list[str]:
    """Store `count` orders directly, `same_time` of them at each instant (create-time ties)."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    ids = []
    with OrdersUnitOfWork(server.service.engines.orders) as uow:
        for i in range(count):
            order, _ = Order.place(
                customer, (OrderItem("SKU-1", 1),), now=base + timedelta(seconds=i // same_time)
            )
            uow.orders.add(order)
            ids.append(order.order_id)
        uow.commit()
    return ids


def test_a_customers_orders_come_newest_first_each_exactly_once_across_pages(quiet_server):
    placed: dict[str, list[str]] = {"alice": [], "bob": []}
    for i in range(30):
        customer = "bob" if i % 4 == 3 else "alice"
        placed[customer].append(quiet_server.stubs.place(customer).order_id)

    alice, sizes = list_all(quiet_server, customer_id="alice", page_size=5)

    ids = [o.order_id for o in alice]
    assert sorted(ids) == sorted(placed["alice"]) and len(ids) == len(set(ids)) == 23
    assert ids == newest_first(alice) == placed["alice"][::-1]
    assert sizes == [5, 5, 5, 5, 3]
    bob, _ = list_all(quiet_server, customer_id="bob", page_size=2)
    assert [o.order_id for o in bob] == placed["bob"][::-1]
    everyone, _ = list_all(quiet_server, page_size=7)
    assert len(everyone) == 30 and [o.order_id for o in everyone] == newest_first(everyone)


def test_orders_in_one_status_come_newest_first_each_exactly_once_across_pages(quiet_server):
    placed = [quiet_server.stubs.place("alice" if i % 2 else "bob").order_id for i in range(20)]
    cancelled = placed[::3]
    for order_id in cancelled:
        quiet_server.stubs.orders.CancelOrder(pb.CancelOrderRequest(order_id=order_id), timeout=10)

    by_status, sizes = list_all(quiet_server, status=pb.ORDER_STATUS_CANCELLED, page_size=3)
    pending, _ = list_all(quiet_server, status=pb.ORDER_STATUS_PENDING, page_size=4)
    alices_cancelled, _ = list_all(
        quiet_server, customer_id="alice", status=pb.ORDER_STATUS_CANCELLED, page_size=1
    )

    assert [o.order_id for o in by_status] == cancelled[::-1]
    assert sizes == [3, 3, 1]
    assert {o.status for o in by_status} == {pb.ORDER_STATUS_CANCELLED}
    assert [o.order_id for o in pending] == [i for i in placed if i not in cancelled][::-1]
    assert [o.order_id for o in alices_cancelled] == [i for i in cancelled if placed.index(i) % 2][::-1]
    assert list_all(quiet_server, status=pb.ORDER_STATUS_VALIDATED)[0] == []


def test_orders_placed_at_the_same_instant_are_each_listed_exactly_once(quiet_server):
    seeded = seed(quiet_server, 30, "tied", same_time=10)

    listed, sizes = list_all(quiet_server, customer_id="tied", page_size=4)

    ids = [o.order_id for o in listed]
    assert sorted(ids) == sorted(seeded) and len(set(ids)) == 30
    assert ids == newest_first(listed)
    assert sizes == [4] * 7 + [2]


def test_page_size_zero_means_fifty_and_more_than_five_hundred_means_five_hundred(quiet_server):
    seed(quiet_server, 501, "bulk")

    default = list_page(quiet_server, customer_id="bulk", page_size=0)
    capped = list_page(quiet_server, customer_id="bulk", page_size=100_000)
    rest = list_page(quiet_server, customer_id="bulk", page_size=100_000, page_token=capped.next_page_token)

    assert len(default.orders) == 50 and default.next_page_token
    assert len(capped.orders) == 500 and capped.next_page_token
    assert len(rest.orders) == 1 and rest.next_page_token == ""
    assert len({o.order_id for o in [*capped.orders, *rest.orders]}) == 501


def test_a_query_that_matches_nothing_gives_an_empty_last_page(quiet_server):
    quiet_server.stubs.place("alice")

    page = list_page(quiet_server, customer_id="nobody")

    assert list(page.orders) == [] and page.next_page_token == ""


def test_a_negative_page_size_is_an_invalid_argument(quiet_server):
    error = rpc_error(quiet_server.stubs.orders.ListOrders, pb.ListOrdersRequest(page_size=-1), timeout=10)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == {"page_size"}


def test_a_page_token_this_server_did_not_issue_for_this_query_is_an_invalid_argument(
    database_url, start_server
):
    server = start_server(database_url=database_url, saga_workers=0)
    peer = start_server(database_url=database_url, saga_workers=0)  # same secret: another instance
    stranger = start_server(database_url=database_url, saga_workers=0, page_token_secret="someone else's")
    for i in range(4):
        server.stubs.place("alice" if i % 2 else "bob")
    token = list_page(server, customer_id="alice", page_size=1).next_page_token
    stranger_token = list_page(stranger, customer_id="alice", page_size=1).next_page_token
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")

    for what, request in (
        ("made up", pb.ListOrdersRequest(customer_id="alice", page_token="bm90LWEtdG9rZW4")),
        ("not base64", pb.ListOrdersRequest(customer_id="alice", page_token="%%%")),
        ("tampered", pb.ListOrdersRequest(customer_id="alice", page_token=tampered)),
        ("another customer", pb.ListOrdersRequest(customer_id="bob", page_token=token)),
        (
            "another status",
            pb.ListOrdersRequest(customer_id="alice", status=pb.ORDER_STATUS_PENDING, page_token=token),
        ),
        ("another secret", pb.ListOrdersRequest(customer_id="alice", page_token=stranger_token)),
    ):
        error = rpc_error(server.stubs.orders.ListOrders, request, timeout=10)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        assert set(field_violations(error)) == {"page_token"}, what

    assert len(list_page(peer, customer_id="alice", page_size=1, page_token=token).orders) == 1


def forge(secret: bytes, body: bytes) -> str:
    """A page token signed as the server signs them, around a body of the forger's choosing."""
    return base64.urlsafe_b64encode(PageTokenCodec(secret)._sign(body) + body).decode().rstrip("=")


ANY_FILTERS = PageTokenCodec._filters(None, None)
SOME_ID = "3f2b8c1e-9a4d-4e7b-8c2f-1a2b3c4d5e6f"
FORGED_BODIES = {
    "naive time": json.dumps(["2026-01-01T00:00:00", SOME_ID, ANY_FILTERS]),
    "time before the calendar in UTC": json.dumps(["0001-01-01T00:00:00+05:00", SOME_ID, ANY_FILTERS]),
    "NUL in the id": json.dumps(["2026-01-01T00:00:00+00:00", "a\u0000b", ANY_FILTERS]),
    "lone surrogate in the id": f'["2026-01-01T00:00:00+00:00","\\ud800","{ANY_FILTERS}"]',
    "id not a UUID": json.dumps(["2026-01-01T00:00:00+00:00", "x" * 5000, ANY_FILTERS]),
    "id a number": json.dumps(["2026-01-01T00:00:00+00:00", 7, ANY_FILTERS]),
    "nested a million deep": "[" * 1_000_000 + "]" * 1_000_000,
}


@pytest.mark.parametrize("secret", [None, "an operator's own secret"], ids=["default-secret", "own-secret"])
def test_a_token_forged_with_the_servers_own_secret_is_an_invalid_argument_and_logs_no_error(
    database_url, start_server, secret, caplog
):
    server = start_server(
        database_url=database_url, saga_workers=0, **({"page_token_secret": secret} if secret else {})
    )
    server.stubs.place("alice")
    key = (secret or Settings().page_token_secret).encode()

    for what, body in FORGED_BODIES.items():
        request = pb.ListOrdersRequest(page_token=forge(key, body.encode()))
        error = rpc_error(server.stubs.orders.ListOrders, request, timeout=10)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        assert set(field_violations(error)) == {"page_token"}, what
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # The same key signing a well-formed body is a token like any other.
    honest = json.dumps(["2027-01-01T00:00:00+00:00", SOME_ID, ANY_FILTERS]).encode()
    assert len(list_page(server, page_token=forge(key, honest)).orders) == 1
