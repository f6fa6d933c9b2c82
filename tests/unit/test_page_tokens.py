"""ListOrders page tokens: they round-trip, and anything this server did not issue is INVALID_ARGUMENT."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from application.paging import PageTokenCodec
from db.orders import PageCursor
from domain.errors import ValidationError

SECRET = b"test-page-token-secret"
CURSOR = PageCursor(datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "3f2b8c1e-9a4d-4e7b-8c2f-1a2b3c4d5e6f")
FILTERS = [(None, None), ("customer-1", None), (None, "PENDING"), ("customer-1", "CANCELLED")]


def _codec(secret: bytes = SECRET) -> PageTokenCodec:
    return PageTokenCodec(secret)


def _assert_rejected(
    token: str,
    customer_id: str | None = "customer-1",
    status: str | None = "PENDING",
    codec: PageTokenCodec | None = None,
) -> None:
    with pytest.raises(ValidationError) as raised:
        (codec or _codec()).decode(token, customer_id, status)
    assert [v.field for v in raised.value.violations] == ["page_token"]


def _unpadded(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


TOKEN = _codec().encode(CURSOR, "customer-1", "PENDING")
FILTERS_DIGEST = PageTokenCodec._filters(None, None)


def _body(create_time: str, order_id: object) -> bytes:
    """A token body in the issued layout, for the query without filters."""
    return json.dumps([create_time, order_id, FILTERS_DIGEST]).encode()


@pytest.mark.parametrize(("customer_id", "status"), FILTERS)
def test_token_round_trips_for_the_filters_it_was_issued_for(
    customer_id: str | None, status: str | None
) -> None:
    codec = _codec()
    assert codec.decode(codec.encode(CURSOR, customer_id, status), customer_id, status) == CURSOR


def test_token_is_url_safe_and_unpadded() -> None:
    assert set(TOKEN) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_token_from_one_instance_works_on_another_with_the_same_secret() -> None:
    assert PageTokenCodec(SECRET).decode(TOKEN, "customer-1", "PENDING") == CURSOR


@given(
    # A day inside both ends of the calendar: the time must exist in UTC, as the column stores it.
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
        ),
    ),
    st.uuids().map(str),
    st.one_of(st.none(), st.text()),
    st.one_of(st.none(), st.sampled_from(["PENDING", "VALIDATED", "FAILED", "CANCELLED"])),
)
def test_any_cursor_round_trips(
    create_time: datetime, order_id: str, customer_id: str | None, status: str | None
) -> None:
    codec = _codec()
    decoded = codec.decode(
        codec.encode(PageCursor(create_time, order_id), customer_id, status), customer_id, status
    )
    assert decoded == PageCursor(create_time, order_id)
    assert decoded.create_time.utcoffset() == create_time.utcoffset()


def test_token_with_any_single_bit_flipped_is_rejected() -> None:
    raw = _raw(TOKEN)
    for index in range(len(raw)):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[index] ^= 1 << bit
            _assert_rejected(_unpadded(bytes(flipped)))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "x",
        "abc",
        "====",
        "not a token",
        TOKEN[:-1],
        TOKEN[:20],
        TOKEN[16:],
        TOKEN + TOKEN,
        "é" * 30,
        _unpadded(b"\x00" * 40),
        _unpadded(b""),
    ],
    ids=[
        "empty",
        "one-char",
        "three-chars",
        "padding",
        "words",
        "truncated-by-one",
        "truncated",
        "prefix-cut",
        "doubled",
        "non-ascii",
        "zeros",
        "empty-bytes",
    ],
)
def test_garbage_token_is_rejected(token: str) -> None:
    _assert_rejected(token)


@given(st.text())
def test_any_text_is_rejected_as_a_token(token: str) -> None:
    _assert_rejected(token)


@given(st.binary())
def test_any_unsigned_bytes_are_rejected_as_a_token(raw: bytes) -> None:
    _assert_rejected(_unpadded(raw))


@pytest.mark.parametrize(
    ("customer_id", "status"),
    [
        (None, None),
        ("customer-2", "PENDING"),
        ("customer-1", None),
        ("customer-1", "VALIDATED"),
        ("", "PENDING"),
        ("Customer-1", "PENDING"),
    ],
)
def test_token_used_with_other_filters_is_rejected(customer_id: str | None, status: str | None) -> None:
    _assert_rejected(TOKEN, customer_id, status)


def test_token_signed_with_another_secret_is_rejected() -> None:
    foreign = _codec(b"another-secret").encode(CURSOR, "customer-1", "PENDING")
    _assert_rejected(foreign)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'["2024-01-01T00:00:00+00:00","id"]',
        b'[1,"id","x"]',
        b'{"a":1}',
        b"null",
        b'["not a date","id","f"]',
        b'["\xff"]',
        b'"abc"',
        _body("2024-01-01T00:00:00", CURSOR.order_id),
        _body("0001-01-01T00:00:00+05:00", CURSOR.order_id),
        _body("9999-12-31T23:00:00-05:00", CURSOR.order_id),
        _body(CURSOR.create_time.isoformat(), "not-a-uuid"),
        _body(CURSOR.create_time.isoformat(), CURSOR.order_id.upper()),
        _body(CURSOR.create_time.isoformat(), "{" + CURSOR.order_id + "}"),
        _body(CURSOR.create_time.isoformat(), CURSOR.order_id + "\x00"),
        _body(CURSOR.create_time.isoformat(), 42),
        b'["2024-01-01T00:00:00+00:00","\\ud800","' + FILTERS_DIGEST.encode() + b'"]',
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=[
        "not-json",
        "empty-list",
        "two-fields",
        "int-time",
        "object",
        "null",
        "bad-date",
        "bad-utf8",
        "three-char-string",
        "naive-time",
        "before-utc-calendar",
        "after-utc-calendar",
        "id-not-uuid",
        "id-upper-case",
        "id-braced",
        "id-with-nul",
        "id-number",
        "id-lone-surrogate",
        "nested-deep",
    ],
)
def test_signed_but_malformed_body_is_rejected_not_crashed(body: bytes) -> None:
    # Whoever holds the secret (the default one is public) can sign any body: it must still be
    # rejected as a field error, never reach a query or raise anything else.
    codec = _codec()
    _assert_rejected(_unpadded(codec._sign(body) + body), customer_id=None, status=None, codec=codec)


def test_signed_body_for_other_filters_is_rejected() -> None:
    codec = _codec()
    body = json.dumps([CURSOR.create_time.isoformat(), CURSOR.order_id, "0" * 16]).encode()
    _assert_rejected(_unpadded(codec._sign(body) + body), codec=codec)


@pytest.mark.parametrize(
    "variant",
    [TOKEN + "!!!!", TOKEN[:8] + "\n\n\n\n" + TOKEN[8:], TOKEN[:8] + "====" + TOKEN[8:], TOKEN + "===="],
    ids=["junk-appended", "newlines-inserted", "padding-inserted", "padding-appended"],
)
def test_only_the_exact_issued_token_string_is_accepted(variant: str) -> None:
    _assert_rejected(variant)
