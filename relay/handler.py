"""The relay's handler: one queued change of an order published to JetStream, acknowledged, then
DONE; what the outbox dispatcher's verdicts (saga.verdicts) make of the broker's answers.

- Acknowledged (stored, or already stored: a duplicate of an earlier publish of the same event
  within the stream's duplicate window): `Done`. The dispatcher marks the event DONE only now, so
  a relay killed between the publish and DONE publishes again, and JetStream drops the second
  message (`Nats-Msg-Id`).
- An outage (`BrokerUnavailableError`: not connected, no acknowledgement in time, no stream took
  it), an open breaker or a denied rate limit: `Defer`, which gives back the attempt its claim
  counted. The breaker and the limiter are the saga's machinery (`saga.resilience.Guard`), an
  instance of their own: a broker outage opens this breaker, never the inventory's.
- JetStream refused the message (`PublishRejectedError`), or the row cannot be made into one:
  `Retry` (an attempt), and DEAD after `max_attempts`. The breaker does not count a refusal.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from db.outbox import ClaimedEvent
from db.recording import KINDS
from relay.messages import message
from relay.publisher import Ack, BrokerUnavailableError, PublishRejectedError
from saga.resilience import BreakerOpenError, Guard, RateLimitedError
from saga.verdicts import Defer, Done, Handler, Retry, Verdict, describe

log = logging.getLogger("orders.relay")

# A publish that failed before the breaker opened comes back after about this long.
OUTAGE_RETRY_S = 0.5

Publish = Callable[[str, bytes, dict[str, str]], Ack]


class EventRelay:
    def __init__(self, publish: Publish, guard: Guard, subject_prefix: str) -> None:
        self._publish = publish
        self._guard = guard
        self._prefix = subject_prefix

    def handlers(self) -> dict[str, Handler]:
        """The handler of every kind of change, for the relay's dispatcher."""
        return dict.fromkeys(KINDS, self.handle)

    def handle(self, event: ClaimedEvent) -> Verdict:
        outgoing = message(event, self._prefix)
        try:
            ack = self._guard.call(self._publish, outgoing.subject, outgoing.data, outgoing.headers)
        except (BreakerOpenError, RateLimitedError, BrokerUnavailableError) as error:
            return self._defer(error)
        except PublishRejectedError as error:
            log.warning("JetStream refused event %s: %s", outgoing.event_id, error)
            return Retry(describe(error))
        log.debug(
            "published %s on %s: %s seq %d%s",
            outgoing.event_id,
            outgoing.subject,
            ack.stream,
            ack.seq,
            " (duplicate)" if ack.duplicate else "",
        )
        return Done()

    def _defer(self, error: Exception) -> Defer:
        if isinstance(error, RateLimitedError):
            delay, reason = self._guard.limiter.retry_after_s(), "events rate limited"
        elif isinstance(error, BrokerUnavailableError) and not self._guard.breaker.refuses_now():
            delay, reason = OUTAGE_RETRY_S, f"broker unavailable: {error}"
        else:
            delay = max(self._guard.breaker.seconds_until_probe(), 0.05)
            reason = "events circuit breaker open"
        return Defer(delay + random.uniform(0, 0.05), reason)
