"""pgbench on the service's own SQL work: the database's limit, to read the service's figures against."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

# The database work of the service, on copies of the real tables (same columns, defaults and
# indexes, no foreign keys): the place transaction (order, items, ORDER_CREATED outbox row), and the
# saga's transactions after it (claim the event; reserve in the inventory: read stock, conditional
# update, reservation rows; complete: order VALIDATED and event DONE, fenced by the lease).
PGBENCH_SETUP = """
DROP TABLE IF EXISTS pgb_order_items, pgb_outbox_events, pgb_orders, pgb_stock, pgb_stock_reservations;
CREATE TABLE pgb_orders (LIKE orders INCLUDING ALL);
CREATE TABLE pgb_order_items (LIKE order_items INCLUDING ALL);
CREATE TABLE pgb_outbox_events (LIKE outbox_events INCLUDING ALL);
CREATE TABLE pgb_stock (LIKE stock INCLUDING ALL);
CREATE TABLE pgb_stock_reservations (LIKE stock_reservations INCLUDING ALL);
INSERT INTO pgb_stock (sku, available, reserved, version, update_time)
  SELECT 'BENCH-' || lpad(g::text, 4, '0'), 1000000000, 0, 1, now() FROM generate_series(0, 999) AS g
  UNION ALL SELECT 'HOT-0001', 1000000000, 0, 1, now();
"""

ITEMS_SPREAD = """INSERT INTO pgb_order_items (order_id, position, sku, quantity)
  SELECT :order_id, g, 'BENCH-' || lpad(((:sku + g) % 1000)::text, 4, '0'), 1
  FROM generate_series(0, :n - 1) AS g;"""
ITEMS_HOT = """INSERT INTO pgb_order_items (order_id, position, sku, quantity)
  VALUES (:order_id, 0, 'HOT-0001', 1);"""

PGBENCH_PLACE = """
\\set n random(1, 3)
\\set sku random(0, 999)
\\set customer random(1, 1000)
BEGIN;
INSERT INTO pgb_orders (id, customer_id, status, failure_reason, version, request_id,
  request_fingerprint, create_time, update_time)
  VALUES (gen_random_uuid()::text, 'bench-' || :customer, 'PENDING', '', 1, gen_random_uuid()::text,
  md5(random()::text), now(), now()) RETURNING id AS order_id \\gset
{items}
INSERT INTO pgb_outbox_events (aggregate_id, event_type, payload, headers, status, attempts,
  available_at, created_at, updated_at)
  VALUES (:order_id, 'ORDER_CREATED', '{{"order_id": "' || :order_id || '", "items": []}}',
  '{{"correlation_id": "bench"}}', 'PENDING', 0, now(), now(), now()) RETURNING id AS event_id \\gset
COMMIT;
"""

PGBENCH_SAGA = """
BEGIN;
UPDATE pgb_outbox_events SET locked_until = now() + interval '30 seconds',
  lease_token = gen_random_uuid()::text, updated_at = now()
  WHERE id = :event_id AND status = 'PENDING' RETURNING lease_token AS lease \\gset
COMMIT;
BEGIN;
SELECT count(*) FROM pgb_stock_reservations WHERE order_id = :order_id;
SELECT s.sku, s.available, s.version FROM pgb_stock s JOIN pgb_order_items i ON i.sku = s.sku
  WHERE i.order_id = :order_id;
UPDATE pgb_stock s SET available = s.available - i.quantity, reserved = s.reserved + i.quantity,
  version = s.version + 1, update_time = now()
  FROM pgb_order_items i WHERE i.order_id = :order_id AND s.sku = i.sku AND s.available >= i.quantity;
INSERT INTO pgb_stock_reservations (order_id, sku, quantity, status, create_time, update_time)
  SELECT order_id, sku, quantity, 'ACTIVE', now(), now() FROM pgb_order_items WHERE order_id = :order_id;
COMMIT;
BEGIN;
UPDATE pgb_orders SET status = 'VALIDATED', version = version + 1, update_time = now()
  WHERE id = :order_id AND version = 1;
UPDATE pgb_outbox_events SET status = 'DONE', locked_until = NULL, updated_at = now()
  WHERE id = :event_id AND lease_token = :lease;
COMMIT;
"""

PGBENCH_SCRIPTS = {
    "place": PGBENCH_PLACE.format(items=ITEMS_SPREAD),
    "place_saga": PGBENCH_PLACE.format(items=ITEMS_SPREAD) + PGBENCH_SAGA,
    "hot_place_saga": PGBENCH_PLACE.format(items=ITEMS_HOT) + PGBENCH_SAGA,
}


def pgbench(dbname: str, clients: int, duration: float) -> dict[str, dict[str, Any]]:
    """pgbench running each script of PGBENCH_SCRIPTS; tps and mean latency of each.

    Extended protocol: `:order_id` goes as a bind parameter (in the simple protocol pgbench would
    paste it unquoted).
    """
    base = ["-h", "127.0.0.1", "-U", "postgres"]
    subprocess.run(
        ["psql", *base, "-q", "-v", "ON_ERROR_STOP=1", "-d", dbname, "-c", PGBENCH_SETUP],
        check=True,
        capture_output=True,
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in PGBENCH_SCRIPTS.items():
            script = Path(tmp) / f"{name}.sql"
            script.write_text(text)
            done = subprocess.run(
                ["pgbench", *base, "-n", "-M", "extended", "-c", str(clients), "-j", "2",
                 "-T", str(max(1, round(duration))), "-f", str(script), dbname],
                capture_output=True,
                text=True,
            )  # fmt: skip
            if done.returncode != 0:
                results[name] = {"error": (done.stderr or done.stdout).strip()[-500:]}
                continue
            tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
            latency = re.search(r"latency average = ([\d.]+) ms", done.stdout)
            failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
            results[name] = {
                "clients": clients,
                "tps": float(tps.group(1)) if tps else None,
                "latency_avg_ms": float(latency.group(1)) if latency else None,
                "failed": int(failed.group(1)) if failed else None,
            }
    return results
