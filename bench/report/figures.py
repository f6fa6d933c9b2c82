"""The figures of a run against their targets: each one a ratio within the run, or a latency or size."""

from __future__ import annotations

from typing import Any

from bench.plan import PICKUP_RATE, RELAY_IN_FLIGHT, SOAK_ORDERS


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def figures(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    pg, lite = result["postgresql"], result.get("sqlite", {})

    def rate(group: dict[str, Any], name: str) -> float | None:
        return (group.get(name) or {}).get("per_s")

    hot = (pg.get("hot") or {}).get("check", {})
    pgbench = pg.get("pgbench") or {}
    place_tps = (pgbench.get("place") or {}).get("tps")
    saga_tps = (pgbench.get("place_saga") or {}).get("tps")
    hot_tps = (pgbench.get("hot_place_saga") or {}).get("tps")
    lag = (pg.get("flow") or {}).get("dispatch_lag") or {}
    half = pg.get("place_half") or {}
    half_lag = half.get("dispatch_lag") or {}
    peak = pg.get("memory_kb", {}).get("VmHWM")
    pg_place = ratio(rate(pg, "place"), rate(pg, "baseline"))
    lite_place = ratio(rate(lite, "place"), rate(lite, "baseline"))
    return [
        ("place / baseline throughput (PostgreSQL)", str(pg_place), ">= 0.30"),
        ("place / baseline throughput (SQLite)", str(lite_place), ">= 0.25"),
        ("flow orders/s / place orders/s", str(ratio(rate(pg, "flow"), rate(pg, "place"))), "-"),
        ("place / pgbench place tps", str(ratio(rate(pg, "place"), place_tps)), "-"),
        ("flow orders/s / pgbench place-plus-saga tps", str(ratio(rate(pg, "flow"), saga_tps)), ">= 0.50"),
        ("hot orders/s / pgbench hot place-plus-saga tps", str(ratio(rate(pg, "hot"), hot_tps)), ">= 0.50"),
        (
            "commit-to-dispatch lag p50 / p99 during flow (32 in flight)",
            f"{lag.get('p50_ms')} / {lag.get('p99_ms')} ms",
            "-",
        ),
        ("place p99 at half the peak rate", f"{half.get('p99_ms')} ms", "<= 25 ms"),
        (
            "the same rate: place p99 with the saga off; Health/Check p99",
            f"{(pg.get('place_half_saga_off') or {}).get('p99_ms')} ms; "
            f"{(pg.get('health_half') or {}).get('p99_ms')} ms",
            "-",
        ),
        (
            "commit-to-dispatch lag p50 / p99 at half the peak place rate",
            f"{half_lag.get('p50_ms')} / {half_lag.get('p99_ms')} ms",
            "p50 <= 5 ms, p99 <= 50 ms",
        ),
        ("hot orders/s / flow orders/s", str(ratio(rate(pg, "hot"), rate(pg, "flow"))), "-"),
        ("hot: no oversell", "yes" if hot.get("no_oversell") else "NO", "zero oversell"),
        ("server peak RSS (PostgreSQL closed-loop run)", f"{(peak or 0) / 1024:.0f} MB", "-"),
        *relay_figures(result.get("relay") or {}),
        *soak_figures(result.get("soak") or {}),
    ]


def relay_figures(relay_result: dict[str, Any]) -> list[tuple[str, str, str]]:
    ours, peer = relay_result.get("pickup") or {}, relay_result.get("pgqueuer_pickup") or {}
    drain, peer_drain = relay_result.get("drain") or {}, relay_result.get("pgqueuer_drain") or {}
    verdicts = [
        "yes" if ours.get(q) is not None and peer.get(q) is not None and ours[q] <= peer[q] else "no"
        for q in ("p50_ms", "p99_ms")
    ]
    return [
        (
            f"pickup latency at {PICKUP_RATE:g} orders/s, PlaceOrder start -> saga handler start, p50 / p99",
            f"{latency(ours.get('p50_ms'))} / {latency(ours.get('p99_ms'))} (pgqueuer, enqueue start -> "
            f"handler start: {latency(peer.get('p50_ms'))} / {latency(peer.get('p99_ms'))}); "
            f"no worse: p50 {verdicts[0]}, p99 {verdicts[1]}",
            "p50 and p99 no worse than pgqueuer's in the same run",
        ),
        (
            f"drain, no-op handler, {RELAY_IN_FLIGHT} in flight ({drain.get('events')} events)",
            f"{drain.get('per_s')} events/s = {ratio(drain.get('per_s'), peer_drain.get('per_s'))} x "
            f"pgqueuer's {peer_drain.get('per_s')}",
            ">= 5,000 events/s and >= 2.5 x pgqueuer's drain in the same run",
        ),
    ]


def latency(value: float | None) -> str:
    return "not all picked up" if value is None else f"{value} ms"


def soak_figures(soak: dict[str, Any]) -> list[tuple[str, str, str]]:
    """RSS once SOAK_ORDERS orders were placed, or at the end of a soak that placed fewer."""
    reached, peak = soak.get("at_target_orders"), soak.get("peak_kb") or 0
    orders, rss = (
        (reached["orders"], reached["rss_kb"]) if reached else (soak.get("orders"), soak.get("end_kb"))
    )
    where = "" if reached else f", end of the soak: fewer than {SOAK_ORDERS:,}"
    return [
        (
            f"server RSS after {orders} orders (peak {peak / 1024:.0f} MB{where})",
            f"{(rss or 0) / 1024:.0f} MB",
            "<= 200 MB after 100,000 orders",
        ),
        (
            f"server RSS growth over the second half of the soak ({soak.get('soak_s', 0):g} s)",
            f"{soak.get('growth_second_half_pct')} %",
            "<= 10 %",
        ),
    ]
