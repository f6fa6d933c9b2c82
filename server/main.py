"""The `orders-server` process: `orders-server [serve]` runs the service (with `--workers N`, as the
supervisor of N server processes: server/supervisor.py), `orders-server migrate` applies the schema
and exits, `orders-server admin` runs operator commands, `orders-server health` probes a running
server (server/probe.py). `python -m server` is the same command.

The service's modules (and SQLAlchemy, limits, ... with them) are imported only by the commands that
use them: `orders-server health` runs as a container's HEALTHCHECK every few seconds and imports grpc
and the health messages only.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from server import affinity

if TYPE_CHECKING:
    from server import supervisor
    from server.affinity import AffinityGuard
    from server.config import Settings

log = logging.getLogger("orders.server")


def migrate(settings: Settings) -> int:
    from server import bootstrap

    engines = bootstrap.make_engines(settings)
    try:
        bootstrap.apply_migrations(engines)
    finally:
        engines.dispose()
    log.info("migrations applied")
    return 0


def serve(
    settings: Settings, link: supervisor.WorkerLink | None = None, guard: AffinityGuard | None = None
) -> int:
    """One server process: alone, or worker `link.index` of a `--workers` supervisor; `guard`
    watches the CPU that `--cpu-affinity auto` pinned it to (server/affinity.py)."""
    from db.backend import backend_of
    from server import bootstrap

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if link is not None:
        link.on_orphaned(stop.set)
    try:
        service = bootstrap.build(settings)
    except bootstrap.BindError as error:
        log.error("%s", error)
        return 1
    service.start()
    # Everything built so far lives as long as the process: out of the collector's sight, a full
    # collection scans only what came after (its pauses under load: docs/performance.md).
    gc.freeze()
    backend = backend_of(service.engines.orders).name
    # A worker's line must not read "orders-server ready on": that one is the supervisor's, once
    # every worker serves.
    who = "orders-server" if link is None else f"orders-server {link.role} {link.index} (pid {os.getpid()})"
    cpus = affinity.describe(affinity.allowed_cpus())
    log.info("%s runs on CPUs %s (--cpu-affinity %s)", who, cpus, settings.cpu_affinity)
    if guard is not None:
        guard.start()
    log.info(
        "%s ready on %s:%d (database: %s, %s)", who, settings.host, service.port, backend, settings.security
    )
    if link is not None:
        link.ready()
    # Woken once a second: a SIGTERM the kernel delivered to another thread only trips the flag
    # that the main thread checks when it runs, and a wait with no timeout would never run it (a
    # restarted worker once ignored the supervisor's SIGTERM until it was killed).
    while not stop.wait(timeout=1.0):
        pass
    if guard is not None:
        guard.stop()
    finished = service.stop(drain_delay=settings.shutdown_delay_s)
    log.info("orders-server stopped")
    if not finished:
        # Saga threads still running would hold the interpreter at exit; their leases hand the
        # events to another process, so leave now.
        logging.shutdown()
        os._exit(0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["health"]:
        from server import probe

        return probe.main(arguments[1:])
    from server import admin, supervisor
    from server.config import parse
    from server.logs import configure

    command, args, settings = parse(arguments)
    link = supervisor.WorkerLink.from_env(os.environ)
    if link is not None and link.sagas_only:
        # Before any thread starts: threads take their creator's niceness (Linux keeps it per thread).
        os.nice(settings.saga_process_nice)
    guard = None
    if command == "serve" and not (link is None and settings.supervised):
        # A server process (not the supervisor of a pool), before any thread starts, for the same
        # reason: threads take their creator's CPU affinity.
        guard = affinity.pin(settings.cpu_affinity, link.index if link is not None else 0)
    if command == "health":
        # Server flags came first (`orders-server --port 1 health`): the probe has options of its own.
        print("orders-server: error: `health` comes first: orders-server health [options]", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format, trace_ids=settings.tracing)
    if command == "migrate":
        return migrate(settings)
    if command == "admin":
        return admin.run(settings, args)
    if link is None and settings.supervised:
        return supervisor.run(settings)
    if link is not None:
        link.tag_logs()
    return serve(settings, link, guard)


if __name__ == "__main__":
    sys.exit(main())
