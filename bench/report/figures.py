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
        *bare_stack_figures(result),
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


def bare_stack_figures(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """PlaceOrder against the bare stack (bench/bare_stack.py) of the same run: throughput at the peak,
    p99 and server CPU per call at the rate of PlaceOrder's half-peak row, and `--workers N`."""
    pg, bare = result["postgresql"], result.get("bare_stack") or {}
    peak, half = bare.get("peak") or {}, bare.get("half") or {}
    place, place_half = pg.get("place") or {}, pg.get("place_half") or {}
    saga_off = pg.get("place_half_saga_off") or {}
    bare_p99 = half.get("p99_ms")
    rows = [
        ("place / bare-stack write throughput", str(ratio(place.get("per_s"), peak.get("per_s"))), ">= 0.50"),
        (
            f"place p99 at half the peak rate ({place_half.get('offered_per_s')}/s), saga on, vs the bare "
            "stack's p99 at the same rate",
            f"{place_half.get('p99_ms')} ms vs {bare_p99} ms = {ratio(place_half.get('p99_ms'), bare_p99)} x",
            "<= 25 ms and <= 3 x",
        ),
        (
            "the same rate, saga off: place p99 vs the bare stack's",
            f"{saga_off.get('p99_ms')} ms vs {bare_p99} ms = {ratio(saga_off.get('p99_ms'), bare_p99)} x",
            "-",
        ),
        (
            "server CPU per call at the same rate: place (saga on; off) vs the bare stack",
            f"{cpu_per_call(place_half)}; {cpu_per_call(saga_off)} vs {cpu_per_call(half)} ms",
            "-",
        ),
    ]
    split = result.get("split") or {}
    if split:
        split_half = split.get("place_half") or {}
        split_place = (split.get("place") or {}).get("per_s")
        saga_tps = ((pg.get("pgbench") or {}).get("place_saga") or {}).get("tps")
        rows += [
            (
                "saga in its own process (`--workers 1 --saga-processes 1`): place / bare-stack write "
                "throughput",
                str(ratio(split_place, peak.get("per_s"))),
                ">= 0.50",
            ),
            (
                "saga in its own process: place p99 at the same half-peak rate vs the bare stack's",
                f"{split_half.get('p99_ms')} ms vs {bare_p99} ms = "
                f"{ratio(split_half.get('p99_ms'), bare_p99)} x",
                "<= 25 ms and <= 3 x",
            ),
            (
                "saga in its own process: flow orders/s / pgbench place-plus-saga tps",
                str(ratio((split.get("flow") or {}).get("per_s"), saga_tps)),
                ">= 0.50",
            ),
        ]
    for count, row in (result.get("workers") or {}).items():
        place_n, bare_n = (row.get("place") or {}).get("per_s"), (row.get("bare_stack") or {}).get("per_s")
        rows.append(
            (
                f"place / bare-stack write throughput, --workers {count} vs the bare stack in {count} "
                "process(es)",
                f"{place_n} / {bare_n} = {ratio(place_n, bare_n)}",
                "-",
            )
        )
    return rows


def cpu_per_call(row: dict[str, Any]) -> str:
    """Milliseconds of the server process's CPU per completed call (its cores over its rate)."""
    cores, rate = (row.get("cpu") or {}).get("server_cores"), row.get("per_s")
    return f"{cores / rate * 1000:.2f}" if cores is not None and rate else "-"


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
