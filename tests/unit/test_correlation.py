"""Correlation ids: a valid client id is kept, anything else is replaced by a new UUID4."""

from __future__ import annotations

import contextvars
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain import correlation

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"


def _is_new_uuid4(value: str) -> bool:
    parsed = uuid.UUID(value)
    return parsed.version == 4 and str(parsed) == value


@pytest.mark.parametrize(
    "value",
    [
        "a",
        "x" * 128,
        "req-42",
        "trace.id:span_1",
        "3f2b8c1e-9a4d-4e7b-8c2f-1a2b3c4d5e6f",
        ":::",
        "-",
        ALPHABET,
    ],
    ids=["one", "128", "dash", "all-punctuation", "uuid", "colons", "single-dash", "alphabet"],
)
def test_valid_correlation_id_is_kept_as_sent(value: str) -> None:
    assert correlation.is_valid(value)
    assert correlation.accept_or_new(value) == value


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "x" * 129,
        "has space",
        " leading",
        "trailing\n",
        "tab\there",
        "naïve",
        "emoji😀",
        "٣",
        "slash/id",
        "comma,id",
        "quote'id",
        "nul\x00",
    ],
    ids=[
        "none",
        "empty",
        "129",
        "space",
        "leading-space",
        "trailing-newline",
        "tab",
        "unicode-letter",
        "emoji",
        "unicode-digit",
        "slash",
        "comma",
        "quote",
        "nul",
    ],
)
def test_invalid_correlation_id_is_replaced_by_a_new_uuid4(value: str | None) -> None:
    assert not correlation.is_valid(value)
    replacement = correlation.accept_or_new(value)
    assert replacement != value
    assert _is_new_uuid4(replacement)


def test_each_replacement_is_a_different_id() -> None:
    assert correlation.accept_or_new("bad id") != correlation.accept_or_new("bad id")


@given(st.text(alphabet=ALPHABET, min_size=1, max_size=128))
def test_any_id_of_the_allowed_alphabet_and_length_is_kept(value: str) -> None:
    assert correlation.accept_or_new(value) == value


@given(st.text(max_size=60), st.characters().filter(lambda c: c not in ALPHABET), st.text(max_size=60))
def test_any_id_with_a_character_outside_the_alphabet_is_replaced(before: str, char: str, after: str) -> None:
    assert _is_new_uuid4(correlation.accept_or_new(before + char + after))


def test_bound_ids_are_visible_inside_and_restored_after() -> None:
    with correlation.bound("outer"):
        with correlation.bound("inner", order_id="order-1"):
            assert correlation.current() == "inner"
            assert correlation.current_order_id() == "order-1"
        assert correlation.current() == "outer"
        assert correlation.current_order_id() is None


def test_bound_restores_the_previous_ids_even_when_the_block_raises() -> None:
    with correlation.bound("outer"):
        with pytest.raises(RuntimeError), correlation.bound("inner", order_id="order-1"):
            raise RuntimeError("boom")
        assert correlation.current() == "outer"
        assert correlation.current_order_id() is None


def test_set_current_lasts_for_the_rest_of_the_context_only() -> None:
    def in_a_call() -> tuple[str | None, str | None]:
        correlation.set_current("call-1")
        correlation.set_order_id("order-1")
        return correlation.current(), correlation.current_order_id()

    before = (correlation.current(), correlation.current_order_id())
    assert contextvars.copy_context().run(in_a_call) == ("call-1", "order-1")
    assert (correlation.current(), correlation.current_order_id()) == before
