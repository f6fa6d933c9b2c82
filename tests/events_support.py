"""What the event relay's tests share: the local NATS server, a stream of their own per test, and
a reader of everything a stream holds (what any consumer of it could be sent).

Each test gets its own stream and subject prefix (`--events-stream`, `--events-subject-prefix`):
subjects of two JetStream streams may not overlap, and the tests share one nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections import defaultdict
from dataclasses import dataclass
from urllib.parse import urlparse

import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from orders_service_api.v1 import events_pb2

from tests.local_services import wait_until


def nats_reachable(url: str) -> str | None:
    """None when something answers on the URL's port, else why not."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout=2):
            return None
    except OSError as error:
        return str(error)


@dataclass(frozen=True)
class EventStream:
    """A stream of one test: its name, the subject prefix the server is given, the NATS URL."""

    url: str
    name: str
    prefix: str

    @classmethod
    def fresh(cls, url: str) -> EventStream:
        tag = uuid.uuid4().hex[:10]
        return cls(url, f"T_{tag}", f"t{tag}.orders.v1")

    def server_args(self) -> list[str]:
        return [
            "--events-url",
            self.url,
            "--events-stream",
            self.name,
            "--events-subject-prefix",
            self.prefix,
        ]

    def settings(self) -> dict[str, str]:
        return {"events_url": self.url, "events_stream": self.name, "events_subject_prefix": self.prefix}

    def read(self) -> list[Received]:
        """Every message the stream holds, in stream order (none if it does not exist yet)."""
        return asyncio.run(_read(self.url, self.name, self.prefix))

    def count(self) -> int:
        """How many messages the stream holds (0 if it does not exist yet)."""
        return asyncio.run(_count(self.url, self.name))

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        """The stream's messages once it holds `count` at least."""
        wait_until(
            lambda: self.count() >= count,
            timeout=timeout,
            interval=0.1,
            what=f"{count} messages in {self.name}",
        )
        return self.read()

    def delete(self) -> None:
        asyncio.run(_delete(self.url, self.name))


@dataclass(frozen=True)
class Received:
    seq: int
    subject: str
    headers: dict[str, str]
    event: events_pb2.OrderEvent

    @property
    def kind(self) -> str:
        return self.subject.rsplit(".", 1)[-1]


async def _read(url: str, stream: str, prefix: str) -> list[Received]:
    """Through an ephemeral pull consumer from the first message, without acknowledgements: a
    consumer as any other, that ends once it has had as many messages as the stream held."""
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=5)
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return []
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30.0
        )
        subscription = await js.pull_subscribe(f"{prefix}.>", stream=stream, config=config)
        got: list[Received] = []
        while len(got) < info.state.messages:
            try:
                batch = await subscription.fetch(1000, timeout=2)
            except nats.errors.TimeoutError:
                break
            for raw in batch:
                event = events_pb2.OrderEvent.FromString(raw.data)
                seq = raw.metadata.sequence.stream
                got.append(Received(seq, raw.subject, dict(raw.headers or {}), event))
        await subscription.unsubscribe()
        return got
    finally:
        await nc.close()


async def _count(url: str, stream: str) -> int:
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        try:
            info = await nc.jetstream(timeout=5).stream_info(stream)
        except nats.js.errors.NotFoundError:
            return 0
        return int(info.state.messages)
    finally:
        await nc.close()


async def _delete(url: str, stream: str) -> None:
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream(timeout=5).delete_stream(stream)
    finally:
        await nc.close()


def by_order(messages: list[Received]) -> dict[str, list[Received]]:
    """Messages grouped by order, each order's in stream order."""
    grouped: dict[str, list[Received]] = defaultdict(list)
    for message in messages:
        grouped[message.event.order_id].append(message)
    return dict(grouped)
