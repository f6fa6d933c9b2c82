"""Opaque, tamper-evident ListOrders page tokens (AIP-158).

A token holds the keyset position (create_time, order_id) of the last order sent and a digest of
the filters it was issued for, signed with HMAC-SHA256. Anything this server did not issue, or a
token reused with other filters, is rejected as INVALID_ARGUMENT. The key is a setting
(`--page-token-secret`) shared by every instance, so a token from one instance works on another.

A valid signature is not trusted to carry a well-formed body: whoever knows the secret (the
default one is public) can sign anything, so the body must still read as a token this server
issues (an aware time, a UUID) before it reaches a query.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime

from db.orders import PageCursor
from domain.errors import FieldViolation, ValidationError

_INVALID = ValidationError([FieldViolation("page_token", "not a page token issued for this query")])


class PageTokenCodec:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _sign(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()[:16]

    @staticmethod
    def _filters(customer_id: str | None, status: str | None) -> str:
        return hashlib.sha256(json.dumps([customer_id, status]).encode()).hexdigest()[:16]

    def encode(self, cursor: PageCursor, customer_id: str | None, status: str | None) -> str:
        body = json.dumps(
            [cursor.create_time.isoformat(), cursor.order_id, self._filters(customer_id, status)],
            separators=(",", ":"),
        ).encode()
        return base64.urlsafe_b64encode(self._sign(body) + body).decode().rstrip("=")

    def decode(self, token: str, customer_id: str | None, status: str | None) -> PageCursor:
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
            if base64.urlsafe_b64encode(raw).decode().rstrip("=") != token:
                raise _INVALID
            signature, body = raw[:16], raw[16:]
            if not hmac.compare_digest(signature, self._sign(body)):
                raise _INVALID
            return _cursor(json.loads(body), self._filters(customer_id, status))
        except ValidationError:
            raise
        # RecursionError: deeply nested JSON; OverflowError: a time that leaves the calendar in UTC.
        except (
            ValueError,
            TypeError,
            OverflowError,
            RecursionError,
            binascii.Error,
            UnicodeDecodeError,
        ) as error:
            raise _INVALID from error


def _cursor(fields: object, filters: str) -> PageCursor:
    """The cursor of a token's body, which must have the shape `encode` gives it."""
    if not (isinstance(fields, list) and len(fields) == 3 and all(isinstance(f, str) for f in fields)):
        raise _INVALID
    create_time, order_id, token_filters = fields
    if token_filters != filters:
        raise _INVALID
    when = datetime.fromisoformat(create_time)
    if when.tzinfo is None:
        raise _INVALID
    when.astimezone(UTC)  # the column stores UTC: the time must exist there
    if str(uuid.UUID(order_id)) != order_id:  # order ids are lower-case hyphenated UUIDs
        raise _INVALID
    return PageCursor(when, order_id)
