"""Bearer tokens and their scopes: the tokens file (`--auth-tokens-file`) and what each method needs.

The file holds one token a line, optionally followed by whitespace and a comma-separated list of
scopes; a token alone on its line has every scope (the file format before scopes existed). Blank
lines and lines starting with `#` are skipped. A token is a single word (RFC 6750 allows no spaces
in one and no `#`):

    # operators: everything
    0b9f3c...
    # the shop front: place, read and cancel orders, read stock
    5e21aa...  orders:write,orders:read,inventory:read

Every method of the order and inventory services needs one scope (`METHOD_SCOPES`); any other
service except health (server reflection) needs a valid token of any scope.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

ORDERS_READ = "orders:read"
ORDERS_WRITE = "orders:write"
INVENTORY_READ = "inventory:read"
INVENTORY_WRITE = "inventory:write"
SCOPES = frozenset({ORDERS_READ, ORDERS_WRITE, INVENTORY_READ, INVENTORY_WRITE})

METHOD_SCOPES: Mapping[str, str] = {
    "/orders.v1.OrderService/PlaceOrder": ORDERS_WRITE,
    "/orders.v1.OrderService/CancelOrder": ORDERS_WRITE,
    "/orders.v1.OrderService/GetOrder": ORDERS_READ,
    "/orders.v1.OrderService/ListOrders": ORDERS_READ,
    "/orders.v1.OrderService/WatchOrder": ORDERS_READ,
    "/orders.v1.InventoryService/SetStock": INVENTORY_WRITE,
    "/orders.v1.InventoryService/GetStock": INVENTORY_READ,
}


class TokenFileError(ValueError):
    """The tokens file cannot be read as tokens and scopes. Its message never holds a token."""


def parse_tokens(text: str) -> dict[str, frozenset[str]]:
    """Each token of a tokens file with its scopes."""
    tokens: dict[str, frozenset[str]] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        token = words[0]
        scopes = _scopes(words[1], number) if len(words) > 1 else SCOPES
        if token in tokens and tokens[token] != scopes:
            raise TokenFileError(
                f"line {number}: the token of line {first_line[token]} again, with other scopes"
            )
        tokens[token] = scopes
        first_line.setdefault(token, number)
    if not tokens:
        raise TokenFileError("the file holds no token")
    return tokens


def _scopes(listed: str, number: int) -> frozenset[str]:
    names = [name.strip() for name in listed.split(",")]
    if not all(names):
        raise TokenFileError(f"line {number}: scopes are one comma-separated list after the token")
    if not set(names) <= SCOPES:
        # Not echoed: a line of two tokens would otherwise print the second one.
        raise TokenFileError(f"line {number}: an unknown scope (known: {', '.join(sorted(SCOPES))})")
    return frozenset(names)


def read_tokens_file(path: str) -> dict[str, frozenset[str]]:
    """`parse_tokens` of the file at `path`; TokenFileError names the path."""
    try:
        return parse_tokens(Path(path).read_text())
    except TokenFileError as error:
        raise TokenFileError(f"{path}: {error}") from None
