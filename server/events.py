"""The event relay's parts (issue 19), built from the settings when `--events-url` is set: the
orders unit of work that records every change of an order (db.recording), the relay's guard
(a breaker and a limiter of its own, the saga's classes), its JetStream publisher, its dispatcher
over the relay's queue, its housekeeping and its metrics. The composition root (server.bootstrap)
calls `build` and wires the two results in; nothing else in the server knows of the relay."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from prometheus_client import Counter, Gauge
from sqlalchemy import Engine

from db.outbox import ClaimedEvent
from db.recording import RecordingOrdersUnitOfWork
from db.relay import RelayUnitOfWork
from db.unit_of_work import OrdersUnitOfWork
from relay.handler import EventRelay
from relay.publisher import JetStreamPublisher, PublishRejectedError, StreamSettings
from relay.service import EventRelayService, RelayHousekeeper
from saga.dispatcher import DispatcherSettings, OutboxDispatcher
from saga.resilience import Guard
from saga.signals import WakeUp
from saga.verdicts import Handler, Verdict
from server import guards
from server.config import Settings
from server.faults import FaultSwitches
from server.metrics import BREAKER_STATES, Metrics


@dataclass
class Relay:
    """What the composition root wires in: the service to start and stop, and the orders unit of
    work that records changes for it (in place of `OrdersUnitOfWork`, everywhere)."""

    service: EventRelayService
    orders_uow: Callable[..., OrdersUnitOfWork]


def build(settings: Settings, orders: Engine, metrics: Metrics) -> Relay:
    wake = WakeUp()
    guard = build_guard(settings)
    observe = _metrics(metrics, guard)
    prefix = settings.events_subject_prefix
    publisher = JetStreamPublisher(
        settings.events_url,
        StreamSettings(
            name=settings.events_stream,
            subjects=(f"{prefix}.>",),
            duplicate_window_s=settings.events_duplicate_window_s,
            max_age_s=settings.events_max_age_s,
        ),
        timeout_s=settings.events_publish_timeout_s,
    )
    relay_uow = partial(RelayUnitOfWork, orders)
    dispatcher = None
    if settings.events_workers > 0:
        handlers = EventRelay(publisher.publish, guard, prefix).handlers()
        if settings.fault_file:
            handlers = _crash_after_publish(handlers, FaultSwitches(settings.fault_file))
        dispatcher = OutboxDispatcher(
            relay_uow,
            handlers,
            DispatcherSettings(
                workers=settings.events_workers,
                poll_interval_s=settings.poll_interval_s,
                lease_s=settings.lease_s,
                max_attempts=settings.max_attempts,
                retry_base_s=settings.retry_base_s,
                retry_max_s=settings.retry_max_s,
                name="relay",
            ),
            wake,
            listener=observe.on_handled,
        )
    housekeeper = RelayHousekeeper(
        relay_uow, settings.outbox_retention_s, settings.housekeeping_interval_s, observe.on_backlog
    )
    return Relay(
        EventRelayService(publisher, dispatcher, housekeeper, guard),
        partial(RecordingOrdersUnitOfWork, orders, on_recorded=wake.set),
    )


def _crash_after_publish(handlers: Mapping[str, Handler], faults: FaultSwitches) -> dict[str, Handler]:
    """Tests only (server.faults): with `{"crash_after_publish": true}` in the fault file, the
    process kills itself after JetStream acknowledged a publish and before the event is DONE."""

    def wrap(handler: Handler) -> Handler:
        def run(event: ClaimedEvent) -> Verdict:
            verdict = handler(event)
            faults.maybe_crash("crash_after_publish")
            return verdict

        return run

    return {kind: wrap(handler) for kind, handler in handlers.items()}


def build_guard(settings: Settings) -> Guard:
    """The breaker and limiter of publishing, apart from the inventory's (a broker outage opens
    this breaker only), with the same `--breaker-*` settings; shared through Redis when
    `--redis-url` is set, like the inventory's (server.guards). A refusal of one message is no
    failure of the broker: the breaker does not count it."""
    return guards.build_guard(
        settings,
        "events",
        settings.events_rate,
        settings.events_publish_timeout_s,
        exclude=[PublishRejectedError],
    )


@dataclass
class _Observers:
    on_handled: Callable[[str, ClaimedEvent, float], None]
    on_backlog: Callable[[int, float], None]


def _metrics(metrics: Metrics, guard: Guard) -> _Observers:
    registry = metrics.registry
    handled = Counter(
        "orders_events_total",
        "relayed events by kind and outcome (done, deferred, retried, dead, fenced, expired)",
        ["kind", "outcome"],
        registry=registry,
    )
    backlog = Gauge("orders_events_backlog", "events waiting to be published (PENDING)", registry=registry)
    oldest = Gauge(
        "orders_events_oldest_pending_seconds",
        "age of the oldest event waiting to be published",
        registry=registry,
    )
    state = Gauge(
        "orders_events_breaker_state", "events breaker: 0 closed, 1 half-open, 2 open", registry=registry
    )
    breaker = guard.breaker
    state.set_function(lambda: float(BREAKER_STATES.get(breaker.current_state, 0)))
    metrics.count_from(
        "orders_events_rate_limit_denials", "event publishes the rate limiter deferred", lambda: guard.denials
    )

    def on_handled(outcome: str, event: ClaimedEvent, _seconds: float) -> None:
        handled.labels(kind=event.event_type, outcome=outcome).inc()

    def on_backlog(pending: int, oldest_s: float) -> None:
        backlog.set(pending)
        oldest.set(oldest_s)

    return _Observers(on_handled, on_backlog)
