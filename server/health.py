"""Health: SERVING only while every database answers and has the schema this code expects."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from domain.deadline import deadline_bound
from server.nonblocking import non_blocking

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ResponseCallback = Callable[[health_pb2.HealthCheckResponse | None], None]


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """`grpc.health.v1.Health` with non-blocking `Watch` streams that cannot deadlock the server.

    grpcio-health-checking's servicer sends Watch updates while holding its lock; a send waits for
    grpcio's serving thread, and that thread, closing another Watch stream, waits for the same lock:
    a status change while a watcher hangs up froze health checks and shutdown. Here the lock only
    guards the tables; sends happen outside it, one status change at a time.

    A Watch of a service this server does not know answers SERVICE_UNKNOWN and stays open, as the
    health protocol says (the service may become known later). Whatever the name, a stream that
    ends leaves nothing behind: any client may send any name, and 10,000 names must not become
    10,000 table entries.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        # NOT_SERVING until the first check has seen the database answer.
        self._status: dict[str, int] = {"": NOT_SERVING}
        self._watchers: dict[str, set[ResponseCallback]] = {}
        self._shutting_down = False

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        with self._lock:
            status = self._status.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    @non_blocking
    def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext, send: ResponseCallback
    ) -> None:
        service = request.service

        def forget() -> None:
            # Called by grpcio once the call has ended (it has its status or was cancelled): there
            # is nothing left to send, only the entry to drop.
            with self._lock:
                watchers = self._watchers.get(service)
                if watchers is not None:
                    watchers.discard(send)
                    if not watchers:
                        del self._watchers[service]

        # Under the send lock: a status change must not send on this stream while its first message
        # is still being sent (grpcio takes one message at a time, and a second send then waits for
        # ever: the change would never arrive).
        with self._send_lock:
            with self._lock:
                status = self._status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                self._watchers.setdefault(service, set()).add(send)
            if not context.add_callback(forget):
                forget()  # the call ended already
                return
            send(health_pb2.HealthCheckResponse(status=status))

    @property
    def watchers(self) -> int:
        """Watch streams registered now."""
        with self._lock:
            return sum(len(sends) for sends in self._watchers.values())

    def set(self, service: str, status: int) -> None:
        with self._send_lock:
            with self._lock:
                if self._shutting_down:
                    return
                self._status[service] = status
                watchers = list(self._watchers.get(service, ()))
            for send in watchers:
                send(health_pb2.HealthCheckResponse(status=status))

    def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service, for good."""
        with self._lock:
            services = list(self._status)
        for service in services:
            self.set(service, NOT_SERVING)
        with self._lock:
            self._shutting_down = True


Check = Callable[[], str | None]  # None when healthy, else why not


class HealthMonitor:
    """Runs the checks every `interval_s` on its own thread and publishes the verdict for the
    overall server ("") and each named service."""

    def __init__(
        self,
        servicer: HealthServicer,
        services: Sequence[str],
        checks: Sequence[Check],
        interval_s: float,
        timeout_s: float = 2.0,
    ) -> None:
        self._timeout_s = timeout_s
        self._servicer = servicer
        self._services = ("", *services)
        self._checks = checks
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)
        self._serving: bool | None = None

    def check_now(self) -> bool:
        problems = []
        # One deadline for the whole round: a database that stops answering (no reset: a
        # partition, a dead host) must turn health NOT_SERVING within it, not hold this thread,
        # and with it the last verdict (SERVING), for as long as the network hangs.
        with deadline_bound(time.monotonic() + self._timeout_s):
            for check in self._checks:
                try:
                    problem = check()
                except Exception as error:
                    first_line = str(error).splitlines()[0] if str(error) else ""
                    problem = f"{type(error).__name__}: {first_line}"
                if problem:
                    problems.append(problem)
        serving = not problems
        if self._stop.is_set():
            return serving
        if serving == self._serving:
            return serving  # Watch streams hear changes only
        if serving:
            log.info("health: SERVING")
        else:
            log.warning("health: NOT_SERVING (%s)", "; ".join(problems))
        self._serving = serving
        for service in self._services:
            self._servicer.set(service, SERVING if serving else NOT_SERVING)
        return serving

    def start(self) -> None:
        self.check_now()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.check_now()

    def shutdown(self) -> None:
        """NOT_SERVING for good: probes stop sending traffic while calls in flight drain."""
        self._stop.set()
        self._servicer.enter_graceful_shutdown()
