"""The markdown page of a run (docs/benchmarks.md): the scenario table, the figures, the notes."""

from __future__ import annotations

from typing import Any

from bench.plan import MACHINE_NOTE
from bench.report.figures import ratio
from bench.report.notes import (
    backlog_text,
    bare_stack_notes,
    flow_cpu_notes,
    half_peak_notes,
    relay_notes,
    split_notes,
    sqlite_backlog_notes,
)


def markdown(result: dict[str, Any]) -> str:
    pg, lite = result["postgresql"], result.get("sqlite", {})
    config = result["config"]
    lines = [
        "# Benchmarks",
        "",
        f"Latest run: `{result['command']}` on {result['time']} ({MACHINE_NOTE}).",
        f"Load: {config['processes']} client processes x {config['threads']} threads "
        f"= {config['in_flight']} calls in flight, closed loop, "
        f"{config['duration_s']:g} s per scenario after {config['warmup_s']:g} s warm-up; "
        f"one `orders-server` ({' '.join(config['server_args'])}, --metrics-port on, otherwise defaults).",
        "",
        "| scenario | database | per s | p50 ms | p95 ms | p99 ms | completed | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def row(name: str, database: str, figures: dict[str, Any] | None) -> None:
        if not figures:
            return
        errors = ", ".join(f"{k} {v}" for k, v in figures["errors"].items()) or "0"
        lines.append(
            f"| {name} | {database} | {figures['per_s']:.0f} | {figures['p50_ms']:.1f} | "
            f"{figures['p95_ms']:.1f} | {figures['p99_ms']:.1f} | {figures['completed']} | {errors} |"
        )

    row("baseline (Health/Check)", "PostgreSQL", pg.get("baseline"))
    row("flow (place, WatchOrder to terminal)", "PostgreSQL", pg.get("flow"))
    row("hot (one SKU, stock for half, place to terminal)", "PostgreSQL", pg.get("hot"))
    row("place (PlaceOrder, 1-3 items of 1,000 SKUs)", "PostgreSQL", pg.get("place"))
    half_rate = (pg.get("place_half") or {}).get("offered_per_s")
    row(f"place, paced at half the peak ({half_rate}/s offered)", "PostgreSQL", pg.get("place_half"))
    row("baseline (Health/Check), paced at the same rate", "PostgreSQL", pg.get("health_half"))
    saga_off = pg.get("place_half_saga_off")
    row("place, paced at the same rate, saga off (`--saga-workers 0`)", "PostgreSQL", saga_off)
    bare = result.get("bare_stack") or {}
    row("bare stack: PlaceOrder as one INSERT + COMMIT, no interceptors", "PostgreSQL", bare.get("peak"))
    row("bare stack, paced at place's half-peak rate", "PostgreSQL", bare.get("half"))
    split = result.get("split") or {}
    own = "saga in its own process"
    row(f"flow, {own} (`--workers 1 --saga-processes 1`)", "PostgreSQL", split.get("flow"))
    row(f"place, {own}", "PostgreSQL", split.get("place"))
    row(f"place, {own}, paced at place's half-peak rate", "PostgreSQL", split.get("place_half"))
    row("baseline (Health/Check)", "SQLite", lite.get("baseline"))
    row("place", "SQLite", lite.get("place"))
    titles = {
        "place": "place transaction",
        "place_saga": "place + saga transactions",
        "hot_place_saga": "hot SKU place + saga transactions",
    }
    for name, bench in (pg.get("pgbench") or {}).items():
        if bench.get("tps"):
            lines.append(
                f"| pgbench: {titles.get(name, name)} ({bench['clients']} clients) | PostgreSQL | "
                f"{bench['tps']:.0f} | avg {bench['latency_avg_ms']:.1f} | | | | {bench.get('failed') or 0} |"
            )
        else:
            lines.append(f"| pgbench: {titles.get(name, name)} | PostgreSQL | failed: {bench.get('error')} |")
    relay_rows(lines, result.get("relay") or {})
    soak = result.get("soak") or {}
    if soak:
        lines.append(
            f"| soak: closed-loop place, {soak['soak_s']:g} s | PostgreSQL | "
            f"{soak['orders'] / soak['soak_s']:.0f} | | | | {soak['orders']} | "
            f"{', '.join(f'{k} {v}' for k, v in soak['errors'].items()) or '0'} |"
        )
    hot = (pg.get("hot") or {}).get("check", {})
    memory = pg.get("memory_kb", {})
    backlog = pg.get("saga_backlog") or {}
    half = pg.get("place_half") or {}
    lag = (pg.get("flow") or {}).get("dispatch_lag") or {}
    handler = (pg.get("flow") or {}).get("saga_handler") or {}
    lines += ["", "| figure | value | target (issues 7 and 17) |", "| --- | --- | --- |"]
    for name, value, target in result["figures"]:
        lines.append(f"| {name} | {value} | {target} |")
    lines += [
        "",
        f"Hot SKU: {hot.get('orders')} orders for {hot.get('initial')} units; after the run available "
        f"{hot.get('available')}, reserved {hot.get('reserved')}, validated orders {hot.get('validated')}, "
        f"settled {hot.get('settled')}.",
        f"Server (PostgreSQL) memory: peak RSS (VmHWM) {memory.get('VmHWM', 0) / 1024:.0f} MB, "
        f"RSS at the end {memory.get('VmRSS', 0) / 1024:.0f} MB.",
        f"Place outruns the saga: {backlog.get('pending_at_end_of_place')} outbox events were PENDING when "
        f"place ended; the saga (8 workers, real handler) drained them at {backlog_text(backlog)}.",
        *sqlite_backlog_notes(lite),
        f"During flow (server metrics, interpolated in the histogram buckets): commit-to-dispatch lag "
        f"p50 {lag.get('p50_ms')} ms, p95 {lag.get('p95_ms')} ms, p99 {lag.get('p99_ms')} ms over "
        f"{lag.get('count')} events; saga handler (claim to outcome) p50 {handler.get('p50_ms')} ms, "
        f"p99 {handler.get('p99_ms')} ms.",
        f"Place paced at half the peak ran on a fresh database; {half.get('backlog_after')} outbox events "
        "were still PENDING when it ended (the saga did not keep up if that is large).",
        *flow_cpu_notes(pg),
        *half_peak_notes(pg),
        *bare_stack_notes(result.get("bare_stack") or {}),
        *split_notes(split),
        *relay_notes(result),
        "",
        *workers_table(result),
        "What the profiles show, and what stands in the way of each target: "
        "[performance.md](performance.md).",
        "",
    ]
    return "\n".join(lines)


def workers_table(result: dict[str, Any]) -> list[str]:
    """Throughput per `--workers N`, each also as a ratio to N = 1 of the same run."""
    runs = result.get("workers") or {}
    if not runs:
        return []
    lines = [
        "Scaling with `--workers N` (each client thread on its own connection; fresh database per N), "
        "beside the bare stack with N processes on one port:",
        "",
        "| workers | baseline per s | place per s | flow per s | bare stack per s | place / baseline | "
        "place / bare stack | baseline vs 1 | place vs 1 | flow vs 1 | bare stack vs 1 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    one = runs.get("1") or {}

    def per_s(row: dict[str, Any], name: str) -> float | None:
        return (row.get(name) or {}).get("per_s")

    names = ("baseline", "place", "flow", "bare_stack")
    for count, row in runs.items():
        cells = [per_s(row, n) for n in names]
        versus = [ratio(per_s(row, n), per_s(one, n)) for n in names]
        lines.append(
            f"| {count} | "
            + " | ".join(f"{c:.0f}" if c is not None else "-" for c in cells)
            + f" | {ratio(cells[1], cells[0])} | {ratio(cells[1], cells[3])} | "
            + " | ".join(str(v) if v is not None else "-" for v in versus)
            + " |"
        )
    lines.append("")
    return lines


def relay_rows(lines: list[str], relay_result: dict[str, Any]) -> None:
    """Drain and pickup rows for the scenario table: ours, then pgqueuer's."""
    for key, name, handler in (
        ("drain", "our outbox dispatcher", "no-op handler"),
        ("events_drain", "our event relay to NATS JetStream", "each published and acknowledged"),
        ("pgqueuer_drain", "pgqueuer", "no-op handler"),
    ):
        drain = relay_result.get(key)
        if drain and "events" in drain:
            lines.append(
                f"| drain: {drain['events']} queued, {handler}, {drain['in_flight']} in flight, "
                f"{name} ({drain['settings']}) | PostgreSQL | {drain['per_s']:.0f} | | | | "
                f"{drain['events']} | 0 |"
            )
    titles = {
        "pickup": "PlaceOrder start -> saga handler start (ours)",
        "pgqueuer_pickup": "enqueue start -> handler start (pgqueuer)",
    }
    for key, name in titles.items():
        row = relay_result.get(key)
        if row:
            cells = " | ".join(
                str(row[q] if row[q] is not None else "-") for q in ("p50_ms", "p95_ms", "p99_ms")
            )
            lines.append(
                f"| pickup at {row['rate_per_s']:g}/s for {row['duration_s']:g} s, {name} | PostgreSQL | "
                f"{row['sent'] / row['duration_s']:.0f} | {cells} | "
                f"{row['paired']} of {row['sent']} paired | 0 |"
            )
