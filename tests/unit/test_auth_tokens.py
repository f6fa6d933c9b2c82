"""The tokens file: one token a line with optional scopes, the old format meaning every scope."""

from __future__ import annotations

import pytest
from orders_service_api.v1 import orders_pb2

from server.auth import METHOD_SCOPES, SCOPES, TokenFileError, parse_tokens


def test_a_token_alone_on_its_line_has_every_scope_as_in_the_old_format() -> None:
    assert parse_tokens("first\nsecond\n") == {"first": SCOPES, "second": SCOPES}


def test_scopes_follow_the_token_as_one_comma_separated_list() -> None:
    text = (
        "# operators\n"
        "  admin  \n"
        "\n"
        "shop\torders:write,orders:read, inventory:read\r\n"
        "stock-keeper inventory:write\n"
    )

    assert parse_tokens(text) == {
        "admin": SCOPES,
        "shop": frozenset({"orders:write", "orders:read", "inventory:read"}),
        "stock-keeper": frozenset({"inventory:write"}),
    }


def test_the_same_token_twice_with_the_same_scopes_is_kept_once() -> None:
    assert parse_tokens("t orders:read\nt orders:read\nu\nu\n") == {
        "t": frozenset({"orders:read"}),
        "u": SCOPES,
    }


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "no token"),
        ("# only a comment\n\n   \n", "no token"),
        ("secret-1 orders:delete\n", "line 1: an unknown scope"),
        ("ok\nsecret-1 secret-2\n", "line 2: an unknown scope"),
        ("secret-1 orders:read,\n", "line 1: scopes are one comma-separated list"),
        ("secret-1 orders:read orders:write\n", "line 1: an unknown scope"),
        ("secret-1\nsecret-1 orders:read\n", "line 2: the token of line 1 again, with other scopes"),
    ],
    ids=[
        "empty",
        "comments-only",
        "unknown-scope",
        "two-tokens-on-a-line",
        "trailing-comma",
        "scopes-not-comma-separated",
        "token-again-with-other-scopes",
    ],
)
def test_a_malformed_file_is_refused_without_showing_a_token(text: str, says: str) -> None:
    with pytest.raises(TokenFileError) as refused:
        parse_tokens(text)

    assert says in str(refused.value)
    assert "secret-" not in str(refused.value)


def test_every_method_of_the_order_and_inventory_services_needs_a_known_scope() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for service in orders_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }

    assert set(METHOD_SCOPES) == methods
    assert set(METHOD_SCOPES.values()) == SCOPES
