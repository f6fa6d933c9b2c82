"""Publishing to NATS JetStream from the relay's worker threads, each publish acknowledged.

nats-py is asyncio; the relay's workers are threads (the outbox dispatcher's pool). One event loop
runs on a thread of its own and holds the one connection; `publish` hands a coroutine to it and
waits for the PubAck, so as many publishes are in flight as workers wait.

The connection is made in the background and kept by nats-py's reconnects (for ever, every
`reconnect_s`): the process starts and serves whether NATS answers or not. While it is not
connected, `publish` fails at once with `BrokerUnavailableError` rather than wait out a timeout,
and so does a publish that got no acknowledgement in time or that no stream took: the relay
defers on those (an outage). `PublishRejectedError` is JetStream saying no to this message: that
one costs an attempt.

The stream: on each (re)connection, and after a publish that no stream took, the publisher looks
the stream up and creates it when it is missing (`StreamSettings`: subjects, file storage, limits
retention, maximum age, duplicate window). It never changes a stream that exists: once there, it
is the operator's (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

log = logging.getLogger("orders.relay")

# What nats-py raises when the broker cannot take a message now.
_OUTAGE = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    asyncio.TimeoutError,
    OSError,
)


class BrokerUnavailableError(Exception):
    """NATS could not take the message now (not connected, no acknowledgement in time, no stream
    answered): an outage, on which the relay defers."""


class PublishRejectedError(Exception):
    """JetStream refused this message (an API error, a payload over the limit)."""


@dataclass(frozen=True)
class StreamSettings:
    name: str
    subjects: tuple[str, ...]
    duplicate_window_s: float
    max_age_s: float

    def config(self) -> StreamConfig:
        return StreamConfig(
            name=self.name,
            subjects=list(self.subjects),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=self.max_age_s,
            duplicate_window=self.duplicate_window_s,
            description="orders-service: changes of orders (orders.v1.OrderEvent)",
        )


@dataclass(frozen=True)
class Ack:
    """JetStream's acknowledgement: the message is stored (or was already, `duplicate`)."""

    stream: str
    seq: int
    duplicate: bool


class JetStreamPublisher:
    """One NATS connection on an event loop thread; `publish` from any thread."""

    def __init__(
        self,
        url: str,
        stream: StreamSettings,
        timeout_s: float = 2.0,
        connect_timeout_s: float = 2.0,
        reconnect_s: float = 0.5,
    ) -> None:
        self._servers = [server.strip() for server in url.split(",") if server.strip()]
        self._stream = stream
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._reconnect_s = reconnect_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay-nats", daemon=True)
        self._client = Client()
        self._js: JetStreamContext | None = None
        self._stream_ready = False
        self._stream_lock: asyncio.Lock | None = None
        self._connecting: concurrent.futures.Future[None] | None = None
        self._down_since: float | None = time.monotonic()  # until the first connection
        self._warned = False
        self._closed = False

    @property
    def connected(self) -> bool:
        return bool(self._client.is_connected) and self._js is not None

    def start(self) -> None:
        self._thread.start()
        self._connecting = asyncio.run_coroutine_threadsafe(self._connect(), self._loop)

    async def _connect(self) -> None:
        self._stream_lock = asyncio.Lock()
        await self._client.connect(
            servers=self._servers,
            name="orders-server event relay",
            allow_reconnect=True,
            max_reconnect_attempts=-1,  # for ever, the first connection too
            reconnect_time_wait=self._reconnect_s,  # type: ignore[arg-type]
            connect_timeout=self._connect_timeout_s,  # type: ignore[arg-type]
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        self._js = self._client.jetstream(timeout=self._timeout_s)
        self._up("connected to NATS at %s")

    async def _on_error(self, error: Exception) -> None:
        if self._down_since is not None and not self._warned and not self._closed:
            self._warned = True
            log.warning(
                "NATS at %s unreachable (%s: %s): events wait in the relay's queue until it answers",
                ", ".join(self._servers),
                type(error).__name__,
                error,
            )

    async def _on_disconnected(self) -> None:
        if self._closed:
            return
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._warned = False
        self._stream_ready = False

    async def _on_reconnected(self) -> None:
        self._up("reconnected to NATS at %s")

    def _up(self, message: str) -> None:
        server = self._client.connected_url
        address = f"{server.hostname}:{server.port}" if server is not None else "?"
        down = self._down_since
        self._down_since, self._warned = None, False
        if down is not None and time.monotonic() - down > 1.0:
            log.info(message + " after %.1f s", address, time.monotonic() - down)
        else:
            log.info(message, address)

    def publish(self, subject: str, data: bytes, headers: Mapping[str, str]) -> Ack:
        """Publish and wait for JetStream's acknowledgement (from any thread but the loop's)."""
        if self._closed or not self.connected:
            raise BrokerUnavailableError("not connected to NATS")
        future = asyncio.run_coroutine_threadsafe(self._publish(subject, data, dict(headers)), self._loop)
        try:
            return future.result(self._timeout_s * 2 + 1)
        except concurrent.futures.TimeoutError as error:
            future.cancel()
            raise BrokerUnavailableError("no acknowledgement from JetStream in time") from error

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str]) -> Ack:
        js = self._js
        assert js is not None
        try:
            if not self._stream_ready:
                await self._ensure_stream(js)
            ack = await js.publish(subject, data, timeout=self._timeout_s, headers=headers)
        except nats.js.errors.NoStreamResponseError as error:
            self._stream_ready = False  # looked up (and made if missing) before the next publish
            raise BrokerUnavailableError(f"no stream took {subject}") from error
        except _OUTAGE as error:
            raise BrokerUnavailableError(f"{type(error).__name__}: {error}") from error
        except (nats.js.errors.APIError, nats.errors.MaxPayloadError, nats.errors.BadHeaderError) as error:
            raise PublishRejectedError(f"{type(error).__name__}: {error}") from error
        return Ack(ack.stream, ack.seq, bool(ack.duplicate))

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        """Look the stream up; create it when it is missing (another instance may at the same time:
        the same configuration is accepted twice)."""
        assert self._stream_lock is not None
        async with self._stream_lock:
            if self._stream_ready:
                return
            name = self._stream.name
            try:
                info = await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                try:
                    info = await js.add_stream(self._stream.config())
                except nats.js.errors.APIError:
                    info = await js.stream_info(name)  # made by another instance meanwhile
                else:
                    log.info(
                        "created JetStream stream %s (subjects %s, duplicate window %g s, max age %g s)",
                        name,
                        ", ".join(self._stream.subjects),
                        self._stream.duplicate_window_s,
                        self._stream.max_age_s,
                    )
            self._check(info.config)
            self._stream_ready = True

    def _check(self, config: Any) -> None:
        window = float(config.duplicate_window or 0)
        if window < self._stream.duplicate_window_s:
            log.warning(
                "JetStream stream %s has a duplicate window of %g s, less than the %g s asked for: a "
                "republished event may reach consumers twice",
                config.name,
                window,
                self._stream.duplicate_window_s,
            )

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush and close the connection, then end the loop's thread."""
        if self._closed:
            return
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._thread.is_alive():
            closing = asyncio.run_coroutine_threadsafe(self._client.close(), self._loop)
            try:
                closing.result(timeout_s)
            except Exception as error:
                log.warning("closing the NATS connection: %s: %s", type(error).__name__, error)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
