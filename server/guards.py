"""A guard (rate limiter, then circuit breaker; saga.resilience) from the settings: the saga's of the
inventory call (server.bootstrap) and the event relay's of publishing (server.events) differ only
in their name, rate, slow-call time and the errors their breaker does not count."""

from __future__ import annotations

from collections.abc import Sequence

import pybreaker
import redis

from saga.resilience import (
    ConcurrentCircuitBreaker,
    FallbackBreakerStorage,
    Guard,
    RateLimiter,
    SharedStateFallback,
)
from server.config import Settings


def build_guard(
    settings: Settings,
    name: str,
    rate: str,
    slow_call_s: float,
    exclude: Sequence[type[BaseException]] = (),
) -> Guard:
    """A breaker and a limiter named `name`, with the `--breaker-*` settings; shared through Redis
    (breaker state under `orders-<name>`, limiter counters under `<name>`) when `redis_url` is set,
    each falling back to per-process state while Redis fails (`SharedStateFallback`)."""
    storage: pybreaker.CircuitBreakerStorage | None = None
    shared_state: SharedStateFallback | None = None
    timeouts = {
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "socket_timeout": settings.redis_socket_timeout_s,
    }
    if settings.redis_url:
        shared_state = SharedStateFallback(retry_s=settings.redis_retry_s)
        client = redis.Redis.from_url(settings.redis_url, **timeouts)
        storage = FallbackBreakerStorage(client, f"orders-{name}", shared_state)
    breaker = ConcurrentCircuitBreaker(
        slow_call_s=slow_call_s,
        fail_max=settings.breaker_fail_max,
        reset_timeout=settings.breaker_reset_s,
        state_storage=storage,
        exclude=list(exclude),
        name=name,
    )
    limiter = RateLimiter(
        rate,
        settings.redis_url or "memory://",
        key=name,
        fallback=shared_state,
        storage_options=timeouts,
    )
    return Guard(breaker, limiter, shared_state)
