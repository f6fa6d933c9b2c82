"""Field rules of API.md "Bounds and edge cases": every bound, every field path, values kept as sent."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from domain import validation
from domain.errors import ValidationError
from domain.model import OrderItem

CONTROL_CHARS = [chr(c) for c in range(0x20)] + ["\x7f"]
ONE_ITEM = [("SKU-1", 1)]
VALID_UUID = "3f2b8c1e-9a4d-4e7b-8c2f-1a2b3c4d5e6f"


def _fields(call: Callable[[], Any]) -> list[str]:
    with pytest.raises(ValidationError) as raised:
        call()
    return [v.field for v in raised.value.violations]


def _place_fields(
    customer_id: str = "c1", items: Sequence[tuple[str, int]] = ONE_ITEM, request_id: str = ""
) -> list[str]:
    return _fields(lambda: validation.place_order(customer_id, items, request_id))


def _items(count: int) -> list[tuple[str, int]]:
    return [(f"SKU-{i}", 1) for i in range(count)]


# --- customer_id ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "customer_id",
    [
        "c",
        "x" * 128,
        "é" * 128,  # 128 code points, 256 UTF-8 bytes
        "😀" * 128,  # 128 code points outside the BMP
        "客户" * 64,
        " padded ",
        "\u0085next-line",  # C1 controls are not C0 or DEL
        "zero\u200bwidth",
    ],
    ids=["one", "128-ascii", "128-latin", "128-emoji", "128-cjk", "spaces", "c1-control", "zwsp"],
)
def test_customer_id_within_bounds_is_accepted_as_sent(customer_id: str) -> None:
    command = validation.place_order(customer_id, ONE_ITEM, "")
    assert command.customer_id == customer_id


@pytest.mark.parametrize(
    "customer_id",
    ["", "x" * 129, "é" * 129, "😀" * 129],
    ids=["empty", "129-ascii", "129-latin", "129-emoji"],
)
def test_customer_id_that_is_empty_or_over_128_code_points_is_rejected(customer_id: str) -> None:
    assert _place_fields(customer_id=customer_id) == ["customer_id"]


@pytest.mark.parametrize("char", CONTROL_CHARS, ids=lambda c: f"U+{ord(c):04X}")
def test_customer_id_with_a_c0_control_or_del_is_rejected(char: str) -> None:
    assert _place_fields(customer_id=f"abc{char}def") == ["customer_id"]


@given(
    st.text(min_size=0, max_size=60),
    st.sampled_from(CONTROL_CHARS),
    st.text(min_size=0, max_size=60),
)
def test_any_customer_id_containing_a_control_char_is_rejected(before: str, char: str, after: str) -> None:
    assert _place_fields(customer_id=before + char + after) == ["customer_id"]


def test_customer_id_is_not_trimmed_folded_or_normalised() -> None:
    decomposed = "Cafe\u0301 "  # 'e' + combining acute, trailing space, upper case
    assert validation.place_order(decomposed, ONE_ITEM, "").customer_id == decomposed


# --- items ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 100])
def test_one_to_a_hundred_items_are_accepted(count: int) -> None:
    assert len(validation.place_order("c1", _items(count), "").items) == count


@pytest.mark.parametrize("count", [0, 101, 1000])
def test_no_items_or_more_than_a_hundred_is_rejected_on_items(count: int) -> None:
    assert _place_fields(items=_items(count)) == ["items"]


@pytest.mark.parametrize(
    "sku",
    ["a", "A" * 64, "Az09._-", "...", "-", "SKU_1.v2-b"],
    ids=["one", "64", "all-classes", "dots", "dash", "mix"],
)
def test_valid_sku_is_accepted_as_sent(sku: str) -> None:
    assert validation.place_order("c1", [(sku, 1)], "").items == (OrderItem(sku, 1),)


@pytest.mark.parametrize(
    "sku",
    [
        "",
        "A" * 65,
        "has space",
        " SKU",
        "SKU\n",
        "sku/1",
        "sku+1",
        "skü",
        "\uff33\uff2b\uff35",
        "٣",
        "sku😀",
        "a\x00",
    ],
    ids=[
        "empty",
        "65",
        "space",
        "leading-space",
        "newline",
        "slash",
        "plus",
        "umlaut",
        "fullwidth",
        "arabic-digit",
        "emoji",
        "nul",
    ],
)
def test_invalid_sku_is_rejected_with_its_item_index(sku: str) -> None:
    items = [("OK-0", 1), ("OK-1", 1), (sku, 1)]
    assert _place_fields(items=items) == ["items[2].sku"]


def test_sku_is_case_sensitive_so_differing_case_is_not_a_duplicate() -> None:
    command = validation.place_order("c1", [("sku-a", 1), ("SKU-A", 2)], "")
    assert [i.sku for i in command.items] == ["sku-a", "SKU-A"]


def test_the_same_sku_twice_is_rejected_at_the_second_occurrence() -> None:
    assert _place_fields(items=[("A", 1), ("B", 1), ("A", 2)]) == ["items[2].sku"]


@pytest.mark.parametrize("quantity", [1, 2, 9_999, 10_000])
def test_quantity_from_one_to_ten_thousand_is_accepted(quantity: int) -> None:
    assert validation.place_order("c1", [("A", quantity)], "").items[0].quantity == quantity


@pytest.mark.parametrize("quantity", [0, -1, 10_001, 2**31 - 1, -(2**31)])
def test_quantity_outside_one_to_ten_thousand_is_rejected_with_its_item_index(quantity: int) -> None:
    assert _place_fields(items=[("A", 1), ("B", 1), ("C", quantity)]) == ["items[2].quantity"]


def test_every_broken_rule_is_reported_at_once_with_its_field_path() -> None:
    fields = _place_fields(
        customer_id="",
        items=[("ok", 1), ("bad sku", 5), ("ok", 0)],
        request_id="r" * 129,
    )
    assert fields == ["customer_id", "items[1].sku", "items[2].sku", "items[2].quantity", "request_id"]


def test_violations_carry_a_description() -> None:
    with pytest.raises(ValidationError) as raised:
        validation.place_order("c1", [("A", 0)], "")
    (violation,) = raised.value.violations
    assert "10000" in violation.description
    assert "items[0].quantity" in str(raised.value)


# --- request_id ----------------------------------------------------------------------------------


def test_empty_request_id_means_no_idempotency_key() -> None:
    assert validation.place_order("c1", ONE_ITEM, "").request_id is None


@pytest.mark.parametrize("request_id", ["r", "r" * 128, "é" * 128, " spaced key "])
def test_request_id_of_one_to_128_code_points_is_kept_as_sent(request_id: str) -> None:
    assert validation.place_order("c1", ONE_ITEM, request_id).request_id == request_id


@pytest.mark.parametrize("request_id", ["r" * 129, "é" * 129])
def test_request_id_over_128_code_points_is_rejected(request_id: str) -> None:
    assert _place_fields(request_id=request_id) == ["request_id"]


@pytest.mark.parametrize("char", CONTROL_CHARS, ids=lambda c: f"U+{ord(c):04X}")
def test_request_id_with_a_c0_control_or_del_is_rejected(char: str) -> None:
    assert _place_fields(request_id=f"key{char}1") == ["request_id"]


# --- the whole command, as properties ------------------------------------------------------------

VALID_CUSTOMER = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="".join(CONTROL_CHARS)),
    min_size=1,
    max_size=128,
)
VALID_SKU = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
VALID_ITEMS = st.lists(
    st.tuples(VALID_SKU, st.integers(1, 10_000)), min_size=1, max_size=100, unique_by=lambda item: item[0]
)
REQUEST_ID = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="".join(CONTROL_CHARS)),
    max_size=128,
)


@given(VALID_CUSTOMER, VALID_ITEMS, REQUEST_ID)
def test_any_valid_request_is_accepted_and_returned_unchanged(
    customer_id: str, items: list[tuple[str, int]], request_id: str
) -> None:
    command = validation.place_order(customer_id, items, request_id)
    assert command.customer_id == customer_id
    assert [(i.sku, i.quantity) for i in command.items] == items
    assert command.request_id == (request_id or None)


@given(VALID_CUSTOMER, VALID_ITEMS, st.randoms(use_true_random=False))
def test_fingerprint_ignores_item_order(customer_id: str, items: list[tuple[str, int]], rng: Any) -> None:
    shuffled = list(items)
    rng.shuffle(shuffled)
    first = validation.place_order(customer_id, items, "key")
    second = validation.place_order(customer_id, shuffled, "key")
    assert first.fingerprint() == second.fingerprint()


@given(VALID_CUSTOMER, VALID_ITEMS, st.data())
def test_fingerprint_changes_with_any_quantity(
    customer_id: str, items: list[tuple[str, int]], data: Any
) -> None:
    index = data.draw(st.integers(0, len(items) - 1))
    sku, quantity = items[index]
    other = data.draw(st.integers(1, 10_000).filter(lambda q: q != quantity))
    changed = [*items[:index], (sku, other), *items[index + 1 :]]
    assert (
        validation.place_order(customer_id, items, "key").fingerprint()
        != validation.place_order(customer_id, changed, "key").fingerprint()
    )


@given(VALID_CUSTOMER, VALID_CUSTOMER, VALID_ITEMS)
def test_fingerprint_changes_with_the_customer(first: str, second: str, items: list[tuple[str, int]]) -> None:
    assume(first != second)
    assert (
        validation.place_order(first, items, "key").fingerprint()
        != validation.place_order(second, items, "key").fingerprint()
    )


def test_fingerprint_changes_when_an_item_is_added_or_a_sku_renamed() -> None:
    base = validation.place_order("c1", [("A", 1)], "key").fingerprint()
    assert validation.place_order("c1", [("A", 1), ("B", 1)], "key").fingerprint() != base
    assert validation.place_order("c1", [("a", 1)], "key").fingerprint() != base


def test_fingerprint_does_not_depend_on_the_request_id_itself() -> None:
    assert (
        validation.place_order("c1", ONE_ITEM, "key-1").fingerprint()
        == validation.place_order("c1", ONE_ITEM, "key-2").fingerprint()
    )


# --- order_id, expected_version, page_size, SetStock ---------------------------------------------


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (VALID_UUID, VALID_UUID),
        (VALID_UUID.upper(), VALID_UUID),
        ("00000000-0000-0000-0000-000000000000", "00000000-0000-0000-0000-000000000000"),
    ],
    ids=["lower", "upper", "nil"],
)
def test_hyphenated_uuid_is_accepted_as_an_order_id(value: str, stored: str) -> None:
    assert validation.order_id(value) == stored


@pytest.mark.parametrize(
    "value",
    [
        "",
        VALID_UUID.replace("-", ""),
        "{" + VALID_UUID + "}",
        "urn:uuid:" + VALID_UUID,
        VALID_UUID + "\n",
        " " + VALID_UUID,
        VALID_UUID[:-1],
        VALID_UUID + "0",
        VALID_UUID[:-1] + "g",
        "not-a-uuid",
        "٣f2b8c1e-9a4d-4e7b-8c2f-1a2b3c4d5e6f",
    ],
    ids=[
        "empty",
        "no-hyphens",
        "braces",
        "urn",
        "newline",
        "leading-space",
        "short",
        "long",
        "non-hex",
        "words",
        "arabic-digit",
    ],
)
def test_anything_but_a_hyphenated_uuid_is_rejected_as_order_id(value: str) -> None:
    assert _fields(lambda: validation.order_id(value)) == ["order_id"]


def test_order_id_violation_uses_the_callers_field_name() -> None:
    assert _fields(lambda: validation.order_id("nope", field="orders[0].order_id")) == ["orders[0].order_id"]


@pytest.mark.parametrize(("value", "expected"), [(0, None), (1, 1), (2**62, 2**62)])
def test_expected_version_zero_means_do_not_check(value: int, expected: int | None) -> None:
    assert validation.expected_version(value) == expected


@pytest.mark.parametrize("value", [-1, -(2**63)])
def test_negative_expected_version_is_rejected(value: int) -> None:
    assert _fields(lambda: validation.expected_version(value)) == ["expected_version"]


@pytest.mark.parametrize(
    ("requested", "used"), [(0, 50), (1, 1), (50, 50), (499, 499), (500, 500), (501, 500), (2**31 - 1, 500)]
)
def test_page_size_zero_means_fifty_and_is_capped_at_five_hundred(requested: int, used: int) -> None:
    assert validation.page_size(requested) == used


@pytest.mark.parametrize("requested", [-1, -(2**31)])
def test_negative_page_size_is_rejected(requested: int) -> None:
    assert _fields(lambda: validation.page_size(requested)) == ["page_size"]


@pytest.mark.parametrize(("value", "expected"), [("", None), ("c1", "c1"), ("😀" * 128, "😀" * 128)])
def test_customer_filter_empty_means_any_customer(value: str, expected: str | None) -> None:
    assert validation.customer_filter(value) == expected


def test_customer_filter_over_128_code_points_is_rejected() -> None:
    assert _fields(lambda: validation.customer_filter("😀" * 129)) == ["customer_id"]


@pytest.mark.parametrize("available", [0, 1, 2**62])
def test_set_stock_accepts_zero_or_more_available(available: int) -> None:
    assert validation.stock_quantity(available) == available


@pytest.mark.parametrize("available", [-1, -(2**63)])
def test_set_stock_rejects_negative_available(available: int) -> None:
    assert _fields(lambda: validation.stock_quantity(available)) == ["available"]


def test_set_stock_sku_follows_the_sku_rules() -> None:
    assert validation.sku("Az09._-") == "Az09._-"
    assert _fields(lambda: validation.sku("bad sku")) == ["sku"]
    assert _fields(lambda: validation.sku("")) == ["sku"]
    assert _fields(lambda: validation.sku("A" * 65)) == ["sku"]
