"""Health: SERVING only while every database answers and has the schema this code expects."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)

Check = Callable[[], str | None]  # None when healthy, else why not


class HealthMonitor:
    """Runs the checks every `interval_s` on its own thread and publishes the verdict for the
    overall server ("") and each named service."""

    def __init__(
        self,
        servicer: health.HealthServicer,
        services: Sequence[str],
        checks: Sequence[Check],
        interval_s: float,
    ) -> None:
        self._servicer = servicer
        self._services = ("", *services)
        self._checks = checks
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)
        self._serving: bool | None = None

    def check_now(self) -> bool:
        problems = []
        for check in self._checks:
            try:
                problem = check()
            except Exception as error:
                problem = f"{type(error).__name__}: {error}"
            if problem:
                problems.append(problem)
        serving = not problems
        if self._stop.is_set():
            return serving
        if serving != self._serving:
            if serving:
                log.info("health: SERVING")
            else:
                log.warning("health: NOT_SERVING (%s)", "; ".join(problems))
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in self._services:
            self._servicer.set(service, status)
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
