"""RefusalLog: every refusal counted, at most one log line per interval, and the rest of a burst
told with its count when the interval is over."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, Counter

from server.admission import RefusalLog
from tests.support import wait_until

LOGGER = "orders.admission"


def test_a_burst_of_refusals_is_one_line_at_once_and_one_with_the_count_after_the_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    counter = Counter("refused", "refused calls", ["method", "reason"], registry=registry)
    refusals = RefusalLog(counter, interval_s=0.3)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == LOGGER]

    try:
        for _ in range(40):
            refusals.refused("/orders.v1.OrderService/GetOrder", "concurrency")
        refusals.refused("/grpc.health.v1.Health/Watch", "stream_limit")
        assert len(lines()) == 1 and lines()[0].startswith("refused 1 call at admission with"), lines()

        told = wait_until(lambda: lines()[1:], timeout=5, what="the burst's count")
    finally:
        refusals.close()

    assert told[0].startswith("refused 40 calls at admission in the last")
    assert "(concurrency: 39, stream_limit: 1)" in told[0]
    assert len(lines()) == 2  # close() had nothing left to tell
    assert (
        registry.get_sample_value(
            "refused_total", {"method": "/orders.v1.OrderService/GetOrder", "reason": "concurrency"}
        )
        == 40
    )
