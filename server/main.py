"""The `orders-server` process: `orders-server [serve]` runs the service, `orders-server migrate`
applies the schema and exits."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from server import admin, bootstrap
from server.config import Settings, parse
from server.logs import configure

log = logging.getLogger("orders.server")


def migrate(settings: Settings) -> int:
    engines = bootstrap.make_engines(settings)
    try:
        bootstrap.apply_migrations(engines)
    finally:
        engines.dispose()
    log.info("migrations applied")
    return 0


def serve(settings: Settings) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service = bootstrap.build(settings)
    except bootstrap.BindError as error:
        log.error("%s", error)
        return 1
    service.start()
    backend = service.engines.orders.dialect.name
    security = "tls" if settings.tls_cert_file else "plaintext"
    if settings.tls_client_ca_file:
        security = "mutual tls"
    log.info(
        "orders-server ready on %s:%d (database: %s, %s)", settings.host, service.port, backend, security
    )
    stop.wait()
    finished = service.stop(drain_delay=settings.shutdown_delay_s)
    log.info("orders-server stopped")
    if not finished:
        # Saga threads still running would hold the interpreter at exit; their leases hand the
        # events to another process, so leave now.
        logging.shutdown()
        os._exit(0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    command, args, settings = parse(argv)
    configure(settings.log_level, settings.log_format)
    if command == "migrate":
        return migrate(settings)
    if command == "admin":
        return admin.run(settings, args)
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
