"""bench.profile's attribution of a sample to a layer: the innermost frame that belongs to a layer
decides, standard-library frames count for their caller, logging and driver calls are their own."""

from __future__ import annotations

import pytest

from bench.profile import OTHER, layer_of, shares

GRPC = "_unary_response_in_pool (grpc/_server.py:700)"
UNARY = "wrap_handler.<locals>.unary (server/interceptors.py:62)"
SERVICER = "OrderServicer.PlaceOrder (server/servicers.py:30)"
APP = "OrderApplication.place_order (application/orders.py:80)"
UOW = "OrdersUnitOfWork.add_order (db/unit_of_work.py:200)"
SA = "Connection._execute_context (sqlalchemy/engine/base.py:1800)"
DRIVER = "DefaultDialect.do_execute (sqlalchemy/engine/default.py:940)"


@pytest.mark.parametrize(
    ("stack", "layer"),
    [
        ([GRPC, UNARY, SERVICER, APP, UOW, SA, DRIVER], "driver (psycopg2, in C)"),
        ([GRPC, UNARY, SERVICER, APP, UOW, SA], "SQLAlchemy"),
        ([GRPC, UNARY, SERVICER, APP, UOW, "dumps (json/__init__.py:231)"], "our database layer (db/)"),
        ([GRPC, UNARY, SERVICER, APP, "uuid4 (uuid.py:723)"], "application (application/, domain/)"),
        ([GRPC, UNARY, "Logger.info (logging/__init__.py:1489)"], "logging"),
        (["Thread.run (threading.py:982)", "_Handoff._write (server/logs.py:150)"], "logging"),
        ([GRPC, UNARY], "interceptors, admission, metrics"),
        ([GRPC, "Condition.notify (threading.py:379)"], "gRPC (grpcio) and its threads"),
        (["<module> (orders-server:8)", "main (server/main.py:40)"], "rest of the server (server/)"),
        (["select (selectors.py:415)"], OTHER),
    ],
)
def test_a_sample_goes_to_the_innermost_layer(stack: list[str], layer: str) -> None:
    assert layer_of(stack) == layer


def test_shares_add_up_per_layer() -> None:
    raw = "\n".join(
        [
            ";".join([GRPC, UNARY, SERVICER, APP, UOW, SA, DRIVER]) + " 6",
            ";".join([GRPC, "Condition.notify (threading.py:379)"]) + " 3",
            ";".join([GRPC, UNARY, SERVICER, APP, UOW, SA, DRIVER]) + " 1",
            "",
        ]
    )
    assert shares(raw) == {"driver (psycopg2, in C)": 0.7, "gRPC (grpcio) and its threads": 0.3}
