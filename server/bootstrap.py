"""The composition root: builds engines, the application, the gRPC server and the saga from Settings.

Nothing is built at import time; `build()` wires everything for one process and `Service.stop()`
takes it apart in the order that loses nothing.

Why one module of this size: the composition root is the one place that knows every part; each
builder below is short, and splitting them would only spread the wiring.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from orders_service_api.v1 import orders_pb2, orders_pb2_grpc
from sqlalchemy import Connection, Engine

from application.orders import OrderApplication
from application.paging import PageTokenCodec
from application.watching import OrderWatcher
from db import migrate, warm
from db.backend import backend_of
from db.engine import EngineSettings, make_engine, normalise_url
from db.inventory import InventoryUnitOfWork, InventoryUowFactory
from db.notifications import Listener, Notifier, listener_name
from db.unit_of_work import OrdersUnitOfWork, OrdersUowFactory
from saga.dispatcher import DispatcherSettings, OutboxDispatcher
from saga.housekeeping import Housekeeper
from saga.inventory import InventoryParticipant, InventorySaga, SagaSettings
from saga.resilience import Guard
from saga.signals import CommitSignals, OrderChanges, WakeUp
from server import guards
from server.admission import HEALTH_WATCH, WATCH_ORDER, Admission, HandlerThreads, stream_kinds
from server.auth import METHOD_SCOPES, read_tokens_file
from server.config import DEFAULT_PAGE_TOKEN_SECRET, Settings
from server.connections import connection_options
from server.faults import FaultSwitches, FaultyParticipant, faulty_batch_handlers, faulty_handlers
from server.health import HealthMonitor, HealthServicer
from server.interceptors import BearerTokenInterceptor, CorrelationInterceptor, ErrorInterceptor
from server.metrics import Metrics, MetricsInterceptor
from server.servicers import InventoryServicer, OrderServicer

if TYPE_CHECKING:
    from relay.service import EventRelayService
    from server.tracing import Tracing

log = logging.getLogger(__name__)

ORDER_SERVICE = orders_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name
INVENTORY_SERVICE = orders_pb2.DESCRIPTOR.services_by_name["InventoryService"].full_name
# Server streams whose handler sends the first message as soon as it starts (the current order,
# the current status): their initial metadata goes out with it (server.reply_metadata).
STREAMS_ANSWERING_AT_ONCE = (WATCH_ORDER, HEALTH_WATCH)


class BindError(RuntimeError):
    pass


@dataclass
class Engines:
    orders: Engine
    inventory: Engine

    @property
    def distinct(self) -> list[Engine]:
        return [self.orders] if self.inventory is self.orders else [self.orders, self.inventory]

    def dispose(self) -> None:
        for engine in self.distinct:
            engine.dispose()


def make_engines(settings: Settings) -> Engines:
    engine_settings = EngineSettings(
        pool_size=settings.pool_size(), statement_timeout_ms=settings.db_statement_timeout_ms
    )
    orders = make_engine(settings.database_url, engine_settings)
    same = normalise_url(settings.inventory_url) == normalise_url(settings.database_url)
    inventory = orders if same else make_engine(settings.inventory_url, engine_settings)
    return Engines(orders, inventory)


def apply_migrations(engines: Engines) -> None:
    migrate.upgrade(engines.orders, migrate.ORDERS)
    migrate.upgrade(engines.inventory, migrate.INVENTORY)


def _schema_check(engine: Engine, part: migrate.Part) -> str | None:
    head = migrate.head(part)
    current = migrate.current(engine, part)  # reading the version table proves the database answers
    if current != head:
        return f"{part.name} schema at {current or 'nothing'}, expected {head}: run `orders-server migrate`"
    return None


@dataclass
class Service:
    """One running process: the gRPC server and everything it needs."""

    settings: Settings
    server: grpc.Server
    port: int
    engines: Engines
    health: HealthMonitor
    changes: OrderChanges
    wake: WakeUp
    guard: Guard
    metrics: Metrics
    housekeeper: Housekeeper
    dispatcher: OutboxDispatcher | None = None
    notifier: Notifier | None = None
    listener: Listener | None = None
    watcher: OrderWatcher | None = None
    admission: Admission | None = None
    relay: EventRelayService | None = None  # with --events-url (server.events)
    tracing: Tracing | None = None  # with --otel-exporter (server.tracing)
    stopped: bool = field(default=False)
    _stop_metrics: Callable[[], None] | None = None

    def start(self) -> None:
        threading.Thread(target=self._warm_pools, name="pool-warm", daemon=True).start()
        # Before the first call: the first orders would otherwise compile them (db.warm).
        compiled = warm.compile_hot_statements(self.engines.orders, self.engines.inventory)
        log.debug("compiled %d hot statements", compiled)
        if self.settings.metrics_port:
            self._stop_metrics = self.metrics.serve(self.settings.host, self.settings.metrics_port)
        if self.notifier is not None:
            self.notifier.start()
        if self.listener is not None:
            self.listener.start()
        self.server.start()
        self.health.start()
        if self.dispatcher is not None:
            self.dispatcher.start()
        if self.relay is not None:
            self.relay.start()
        self.housekeeper.start()

    def _warm_pools(self) -> None:
        """Open PostgreSQL connections at start, in the background: as many as the saga workers
        and a few handlers use at once, so that the first calls after a start do not each wait
        for a new backend (milliseconds apiece), nor for its first look at the tables
        (`db.warm.look_at_tables`). The pools open more on demand, up to their size. A database
        that is down fails nothing here: health reports it."""
        want = min(self.settings.pool_size(), self.settings.sagas_here + 8)
        for engine in self.engines.distinct:
            if backend_of(engine).embedded:  # no server connections to open ahead
                continue
            opened: list[Connection] = []
            try:
                for _ in range(want):
                    opened.append(engine.connect())
                names = warm.service_tables(opened[0])
                for connection in opened:
                    warm.look_at_tables(connection, names)
                    connection.rollback()
            except Exception as error:
                log.warning("could not open database connections ahead (%s)", type(error).__name__)
            finally:
                for connection in opened:
                    connection.close()

    def stop(self, grace: float | None = None, drain_delay: float = 0.0) -> bool:
        """Health NOT_SERVING (then `drain_delay` seconds of serving on, for load balancers to
        notice), watch streams end, calls in flight get `grace`, then close. False when saga steps
        were still running after the grace: they are left to their leases, and the caller should
        end the process rather than wait for their threads."""
        if self.stopped:
            return True
        self.stopped = True
        grace = self.settings.grace_period_s if grace is None else grace
        self.health.shutdown()
        if drain_delay > 0:
            time.sleep(drain_delay)
        self.changes.close()
        if self.watcher is not None:
            self.watcher.close()
        server_stopped = self.server.stop(grace)
        finished = True
        if self.dispatcher is not None and not self.dispatcher.stop(grace):
            log.warning("saga steps still running after %.1fs are left to their leases", grace)
            finished = False
        if self.relay is not None and not self.relay.stop(grace):
            finished = False
        server_stopped.wait()
        if self.admission is not None:
            self.admission.close()
        self.housekeeper.stop()
        if self._stop_metrics is not None:
            self._stop_metrics()
        if self.listener is not None:
            self.listener.stop()
        if self.notifier is not None:
            self.notifier.stop()
        if self.tracing is not None:
            self.tracing.shutdown()  # the spans still queued go out
        self.engines.dispose()
        return finished


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def migrate_if_configured(settings: Settings, engines: Engines) -> bool:
    """Apply migrations when `migrate_on_start` says so: `always`, or `auto` on SQLite only (the
    embedded default migrates itself; PostgreSQL waits for `orders-server migrate`)."""
    wanted = settings.migrate_on_start == "always" or (
        settings.migrate_on_start == "auto" and all(backend_of(e).embedded for e in engines.distinct)
    )
    if wanted:
        apply_migrations(engines)
    return wanted


def build(settings: Settings) -> Service:
    """The whole service from its settings: each part from a builder below, wired through
    constructors (nothing is patched in after it is made)."""
    engines = make_engines(settings)
    migrate_if_configured(settings, engines)
    _warn_about_defaults(settings, engines)
    wake, changes = WakeUp(), OrderChanges()
    notifier, listener = _notifications(engines, wake, changes)
    # What the saga and the housekeeper announce after their commits; PlaceOrder's signals also
    # hand events to the local dispatcher (built with it below).
    announce = CommitSignals(wake, changes, notifier)
    orders_uow: OrdersUowFactory = partial(OrdersUnitOfWork, engines.orders)
    inventory_uow = partial(InventoryUnitOfWork, engines.inventory)
    guard = build_guard(settings)
    metrics = _metrics(engines, guard)
    # With --events-url every change of an order is recorded for the event relay (server.events).
    relay = None
    if settings.events_url:
        from server import events  # imported only then: nats-py is an optional dependency

        relay = events.build(settings, engines.orders, metrics)
        orders_uow = relay.orders_uow
    tracing = _tracing(settings)
    dispatcher = _dispatcher(settings, orders_uow, inventory_uow, guard, metrics, announce, wake, tracing)
    app = OrderApplication(
        orders_uow=orders_uow,
        inventory_uow=inventory_uow,
        page_tokens=PageTokenCodec(settings.page_token_secret.encode()),
        signals=CommitSignals(wake, changes, notifier, handoff=dispatcher),
    )
    watcher = OrderWatcher(app.get_order, changes, max_lifetime_s=settings.watch_max_lifetime_s)
    server, port, health_servicer, admission = _grpc_server(settings, app, watcher, metrics, tracing)
    monitor = _health_monitor(settings, engines, health_servicer)
    housekeeper = Housekeeper(
        orders_uow,
        settings.outbox_retention_s,
        interval_s=settings.housekeeping_interval_s,
        on_backlog=metrics.on_backlog,
        saga_timeout_s=settings.saga_timeout_s,
        on_commit=announce.outbox_committed,
    )
    return Service(
        settings,
        server,
        port,
        engines,
        monitor,
        changes,
        wake,
        guard,
        metrics,
        housekeeper,
        dispatcher,
        notifier,
        listener,
        watcher=watcher,
        admission=admission,
        relay=relay.service if relay is not None else None,
        tracing=tracing,
    )


def _tracing(settings: Settings) -> Tracing | None:
    """OpenTelemetry when asked for; only then is server.tracing (and the SDK) imported."""
    if not settings.tracing:
        return None
    from server.tracing import Tracing

    return Tracing.start(settings)


def _warn_about_defaults(settings: Settings, engines: Engines) -> None:
    """Defaults that are fine for a first try on the embedded database and not beyond it."""
    shared = not backend_of(engines.orders).embedded
    if shared and settings.page_token_secret == DEFAULT_PAGE_TOKEN_SECRET:
        log.warning(
            "--page-token-secret is the built-in default, which anyone can read in the source: "
            "set a secret of your own, the same on every instance"
        )


def _notifications(
    engines: Engines, wake: WakeUp, changes: OrderChanges
) -> tuple[Notifier | None, Listener | None]:
    """NOTIFY after commits and LISTEN for other processes', where the database has them."""
    if not backend_of(engines.orders).notifies:
        return None, None
    # This process's listener is no peer of its notifier (db/notifications.py).
    listener_app = listener_name()
    notifier = Notifier(engines.orders, own_listener=listener_app)
    listener = Listener(
        engines.orders,
        wake.set,
        changes.publish,
        sent_locally=notifier.sent_by_me,
        application_name=listener_app,
    )
    return notifier, listener


def _metrics(engines: Engines, guard: Guard) -> Metrics:
    metrics = Metrics()
    metrics.watch_breaker(guard.breaker)
    metrics.count_from(
        "orders_rate_limit_denials", "inventory calls the rate limiter deferred", lambda: guard.denials
    )
    metrics.watch_pool("orders", engines.orders.pool.checkedout)  # type: ignore[attr-defined]
    if engines.inventory is not engines.orders:
        metrics.watch_pool("inventory", engines.inventory.pool.checkedout)  # type: ignore[attr-defined]
    return metrics


def _dispatcher(
    settings: Settings,
    orders_uow: OrdersUowFactory,
    inventory_uow: InventoryUowFactory,
    guard: Guard,
    metrics: Metrics,
    announce: CommitSignals,
    wake: WakeUp,
    tracing: Tracing | None = None,
) -> OutboxDispatcher | None:
    """The inventory saga on its outbox dispatcher (None with `--saga-workers 0`), set-based on
    every backend (a round's ORDER_CREATED events together, see saga.inventory); with a fault
    file, the fault wrappers around the participant and the handlers (server.faults); with
    tracing, each step a span (server.tracing)."""
    if settings.sagas_here <= 0:
        return None
    faults = FaultSwitches(settings.fault_file) if settings.fault_file else None
    participant = InventoryParticipant(inventory_uow)
    metrics.count_from(
        "orders_stock_conflict_retries",
        "inventory transactions retried after a conflict",
        lambda: participant.conflict_retries,
    )
    saga = InventorySaga(
        orders_uow,
        participant if faults is None else FaultyParticipant(participant, faults),
        guard,
        SagaSettings(max_attempts=settings.max_attempts, saga_timeout_s=settings.saga_timeout_s),
        on_order_settled=announce.order_settled,
        on_outcome=metrics.on_saga_outcome,
        batching=True,
    )
    handlers = saga.handlers() if faults is None else faulty_handlers(saga.handlers(), faults)
    batch_handlers = saga.batch_handlers()
    if faults is not None:
        batch_handlers = faulty_batch_handlers(batch_handlers, faults)
    if tracing is not None:
        handlers, batch_handlers = (
            tracing.traced_handlers(handlers),
            tracing.traced_batch_handlers(batch_handlers),
        )
    return OutboxDispatcher(
        orders_uow,
        handlers,
        DispatcherSettings(
            workers=settings.sagas_here,
            poll_interval_s=settings.poll_interval_s,
            lease_s=settings.lease_s,
            max_attempts=settings.max_attempts,
            retry_base_s=settings.retry_base_s,
            retry_max_s=settings.retry_max_s,
        ),
        wake,
        renewal_paused=(lambda: False) if faults is None else faults.renewal_paused,
        listener=metrics.on_handled,
        on_claimed=metrics.on_claimed,
        batch_handlers=batch_handlers,
    )


def _grpc_server(
    settings: Settings,
    app: OrderApplication,
    watcher: OrderWatcher,
    metrics: Metrics,
    tracing: Tracing | None = None,
) -> tuple[grpc.Server, int, HealthServicer, Admission]:
    """The gRPC server with its interceptors, services, health and reflection, bound to its port."""
    # Admission, not grpcio's maximum_concurrent_rpcs (which counts open streams), limits the calls
    # on the handler threads; streams run off them, capped per kind (server/admission.py).
    threads = HandlerThreads(max_workers=settings.max_workers, thread_name_prefix="grpc")
    admission = Admission(
        threads,
        settings.max_concurrent_rpcs,
        stream_kinds(
            settings.max_health_watch_streams, settings.max_reflection_streams, settings.max_watch_streams
        ),
        metrics,
    )
    server = grpc.server(
        threads,
        interceptors=[
            admission,  # first: it decides before the others run, and wraps their handlers
            CorrelationInterceptor(STREAMS_ANSWERING_AT_ONCE)
            if tracing is None
            else tracing.correlation_interceptor(STREAMS_ANSWERING_AT_ONCE),
            MetricsInterceptor(metrics),
            ErrorInterceptor(),
            *(
                [BearerTokenInterceptor(read_tokens_file(settings.auth_tokens_file), METHOD_SCOPES)]
                if settings.auth_tokens_file
                else []
            ),
        ],
        options=[
            # A second server must not silently share the port (grpcio turns reuseport on by default);
            # only the processes of `--workers N` share it, on purpose (server/supervisor.py).
            ("grpc.so_reuseport", 1 if settings.supervised else 0),
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            *connection_options(settings),
        ],
        maximum_concurrent_rpcs=None,
    )
    orders_pb2_grpc.add_OrderServiceServicer_to_server(OrderServicer(app, watcher), server)
    orders_pb2_grpc.add_InventoryServiceServicer_to_server(InventoryServicer(app), server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            ORDER_SERVICE,
            INVENTORY_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = _address(settings.host, settings.port)
    credentials = _tls(settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise BindError(f"could not bind {address}")
    return server, port, health_servicer, admission


def _health_monitor(settings: Settings, engines: Engines, health_servicer: HealthServicer) -> HealthMonitor:
    """SERVING while every database answers with the expected schema."""
    checks = [
        partial(_schema_check, engines.orders, migrate.ORDERS),
        partial(_schema_check, engines.inventory, migrate.INVENTORY),
    ]
    return HealthMonitor(
        health_servicer, (ORDER_SERVICE, INVENTORY_SERVICE), checks, settings.health_interval_s
    )


def _tls(settings: Settings) -> grpc.ServerCredentials | None:
    """Server TLS credentials, with client certificates required when a client CA is set (mTLS)."""
    if not settings.tls_cert_file:
        return None
    key = Path(settings.tls_key_file).read_bytes()
    chain = Path(settings.tls_cert_file).read_bytes()
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def build_guard(settings: Settings) -> Guard:
    """Breaker and limiter of the inventory call (server.guards)."""
    return guards.build_guard(settings, "inventory", settings.inventory_rate, settings.breaker_slow_call_s)
