"""The README's grpcurl walkthrough, run as written against a real `orders-server` process.

The commands are read from README.md between the walkthrough markers and run in order with the real
grpcurl binary (`make grpcurl`), each address swapped for the test server's. `NAME=$(grpcurl ... | jq -r
.path)` keeps a value for later `$NAME`s (the path is followed here, so jq is not needed), and every
`# => ...` line under a command is checked against its output: `"key": value, ...` must all hold in one
JSON object of the output, anything else must appear in it as text. Read-only calls are repeated until
their expectations hold, as the README tells a reader to do while the saga works in the background.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import ServerProcess, wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
START = "<!-- walkthrough:"
END = "<!-- end of walkthrough -->"
README_ADDRESS = "127.0.0.1:50051"
# Calls that change nothing: repeated until their expectations hold (the saga is asynchronous).
READ_ONLY = ("list", "describe", "/GetOrder", "/GetStock", "/ListOrders", "/WatchOrder", "/Check")
CAPTURE = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*)=\$\((?P<command>grpcurl .*?)\s*\|\s*jq -r (?P<path>\S+)\)$")
VARIABLE = re.compile(r"\$(?:\{(?P<braced>[A-Z][A-Z0-9_]*)\}|(?P<plain>[A-Z][A-Z0-9_]*))")
SETTLED = {"ORDER_STATUS_VALIDATED", "ORDER_STATUS_FAILED", "ORDER_STATUS_CANCELLED"}


def grpcurl_binary() -> str:
    """ORDERS_TEST_GRPCURL if set, else the grpcurl of `make grpcurl` (.venv/bin), else one on PATH."""
    candidates = [
        os.environ.get("ORDERS_TEST_GRPCURL", ""),
        str(Path(sys.executable).parent / "grpcurl"),
        str(ROOT / ".venv" / "bin" / "grpcurl"),
        shutil.which("grpcurl") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "no grpcurl binary: run `make grpcurl` (installs it into .venv/bin/grpcurl), "
        "or point ORDERS_TEST_GRPCURL at one"
    )


# --- reading the walkthrough -------------------------------------------------------------------


@dataclass
class Command:
    text: str  # as in the README, continuation lines joined
    argv: list[str]  # grpcurl's arguments, `$NAME`s still in them
    capture: tuple[str, str] | None = None  # (variable, jq path)
    expectations: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        """What is called: `orders.v1.OrderService/GetOrder`, `list`, `describe orders.v1.OrderService`."""
        address = self.argv.index(README_ADDRESS)
        return " ".join(self.argv[address + 1 :])

    def payload(self) -> dict[str, Any]:
        """The request (`-d`), as written in the README."""
        if "-d" not in self.argv:
            return {}
        return dict(json.loads(self.argv[self.argv.index("-d") + 1]))

    @property
    def read_only(self) -> bool:
        return any(self.target.startswith(k) or self.target.endswith(k) for k in READ_ONLY)


def walkthrough_blocks(readme: str) -> list[str]:
    start, end = readme.find(START), readme.find(END)
    assert 0 <= start < end, f"README.md has no walkthrough between {START!r} and {END!r}"
    blocks = re.findall(r"^```sh\n(.*?)^```$", readme[start:end], flags=re.M | re.S)
    assert blocks, "the README walkthrough has no ```sh block"
    return blocks


def logical_lines(block: str) -> Iterator[str]:
    pending = ""
    for line in block.splitlines():
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        yield (pending + line.strip()).strip()
        pending = ""
    assert not pending, f"a command ends in a line continuation: {pending!r}"


def parse_walkthrough(readme: str) -> list[Command]:
    commands: list[Command] = []
    for block in walkthrough_blocks(readme):
        for line in logical_lines(block):
            if not line or (line.startswith("#") and not line.startswith("# =>")):
                continue
            if line.startswith("# =>"):
                assert commands, f"an expectation before any command: {line!r}"
                commands[-1].expectations.append(line.removeprefix("# =>").strip())
            elif line.startswith("echo "):
                continue  # shows a variable to the reader; nothing to run
            elif match := CAPTURE.match(line):
                argv = shlex.split(match["command"])
                commands.append(Command(line, argv[1:], capture=(match["name"], match["path"])))
            elif line.startswith("grpcurl "):
                commands.append(Command(line, shlex.split(line)[1:]))
            else:
                raise AssertionError(f"the walkthrough may hold only grpcurl commands, not {line!r}")
    for command in commands:
        assert command.argv.count(README_ADDRESS) == 1, f"{command.text!r} must call {README_ADDRESS} once"
    return commands


# --- running it --------------------------------------------------------------------------------


def substitute(text: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match["braced"] or match["plain"]
        assert name in variables, f"${name} is used before the walkthrough sets it"
        return variables[name]

    return VARIABLE.sub(value, text)


def json_documents(output: str) -> list[Any]:
    """The JSON objects in grpcurl's output, one per message (`-v` puts text around them)."""
    decoder = json.JSONDecoder()
    documents: list[Any] = []
    position = 0
    for match in re.finditer(r"^\{", output, flags=re.M):
        if match.start() >= position:
            document, position = decoder.raw_decode(output, match.start())
            documents.append(document)
    return documents


def objects(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from objects(child)
    elif isinstance(value, list):
        for child in value:
            yield from objects(child)


def expectation_holds(expectation: str, output: str, documents: list[Any]) -> bool:
    try:
        wanted = json.loads("{" + expectation + "}")
    except json.JSONDecodeError:
        return expectation in output
    return any(all(found.get(key) == value for key, value in wanted.items()) for found in objects(documents))


def follow(document: Any, path: str) -> str:
    assert re.fullmatch(r"(\.[A-Za-z_][A-Za-z0-9_]*)+", path), f"jq path {path!r} is more than .a.b"
    for key in path.strip(".").split("."):
        document = document[key]
    return str(document)


@dataclass
class Step:
    command: Command
    argv: list[str]
    output: str
    documents: list[Any]

    def orders(self) -> list[dict[str, Any]]:
        found = [d["order"] for d in self.documents if "order" in d]
        return found + [o for d in self.documents for o in d.get("orders", [])]


class Walkthrough:
    def __init__(self, grpcurl: str, server: ServerProcess) -> None:
        self.grpcurl = grpcurl
        self.server = server
        self.variables: dict[str, str] = {}
        self.steps: list[Step] = []

    def run(self, command: Command) -> Step:
        argv = [substitute(arg, self.variables) for arg in command.argv]
        argv = [self.server.address if arg == README_ADDRESS else arg for arg in argv]
        expectations = [substitute(e, self.variables) for e in command.expectations]

        def attempt() -> Step | None:
            done = subprocess.run(
                [self.grpcurl, *argv], capture_output=True, text=True, timeout=30, check=False
            )
            assert done.returncode == 0, (
                f"{command.text}\nexited {done.returncode}:\n{done.stdout}{done.stderr}\n"
                f"server log:\n{self.server.log()}"
            )
            documents = json_documents(done.stdout)
            step = Step(command, argv, done.stdout, documents)
            if all(expectation_holds(e, done.stdout, documents) for e in expectations):
                return step
            assert command.read_only, f"{command.text}\nexpected {expectations}, got:\n{done.stdout}"
            return None

        step = wait_until(attempt, timeout=15, interval=0.1, what=f"{command.text} to show {expectations}")
        if command.capture is not None:
            name, path = command.capture
            [document] = step.documents
            self.variables[name] = follow(document, path)
        self.steps.append(step)
        return step

    def calls(self, target: str) -> list[Step]:
        """The steps that called `target` (a method, or its last part such as `/GetOrder`)."""
        return [s for s in self.steps if s.command.target.endswith(target)]


# --- the test ----------------------------------------------------------------------------------


def test_the_readme_opens_with_make_run_and_make_test() -> None:
    title, opening = re.split(r"\n+```sh\n", README.read_text(), maxsplit=1)
    assert title.startswith("# ") and "\n" not in title, "only the title comes before the two commands"
    commands = [line.split("#")[0].strip() for line in opening.split("```")[0].splitlines()]
    assert commands == ["make run", "make test"]


def test_the_readme_walkthrough_works_as_written(spawn_server: Callable[..., ServerProcess]) -> None:
    commands = parse_walkthrough(README.read_text())
    grpcurl = grpcurl_binary()
    # As `make run` starts it: no configuration, the embedded SQLite file under ./var/ of a fresh
    # working directory (spawn_server only adds --port 0).
    server = spawn_server()
    walkthrough = Walkthrough(grpcurl, server)

    for command in commands:
        walkthrough.run(command)

    # The key outcomes, whatever the README's own `# =>` lines say.
    services = walkthrough.calls("list")[0].output.split()
    assert {"orders.v1.OrderService", "orders.v1.InventoryService", "grpc.health.v1.Health"} <= set(services)

    [set_stock] = walkthrough.calls("/SetStock")
    initial = set_stock.documents[0]
    sku = initial["sku"]

    placed = walkthrough.calls("/PlaceOrder")
    # A replay (same request_id) returns the first order as it is now: only first calls are PENDING.
    keys = [step.command.payload().get("request_id") for step in placed]
    first_calls = [s for i, s in enumerate(placed) if not keys[i] or keys[i] not in keys[:i]]
    assert all(step.orders()[0]["status"] == "ORDER_STATUS_PENDING" for step in first_calls)
    traced = [s for s in placed if "-H" in s.argv]
    assert traced, "the walkthrough sends no x-correlation-id"
    correlation_id = traced[0].argv[traced[0].argv.index("-H") + 1].split(":", 1)[1].strip()
    assert f"x-correlation-id: {correlation_id}" in traced[0].output
    log = server.log()
    assert re.search(rf"\[grpc_\d+\] .*correlation_id={re.escape(correlation_id)} .*PlaceOrder", log)
    assert re.search(rf"\[saga_\d+\] .*correlation_id={re.escape(correlation_id)} ", log)

    variables = walkthrough.variables
    order_id = variables["ORDER_ID"]
    assert order_id == traced[0].orders()[0]["order_id"], "a PlaceOrder replayed with its request_id"

    def statuses(suffix: str) -> dict[str, dict[str, Any]]:
        return {o["order_id"]: o for step in walkthrough.calls(suffix) for o in step.orders()}

    got = statuses("/GetOrder")
    assert got[order_id]["status"] == "ORDER_STATUS_VALIDATED"
    failed = [o for o in got.values() if o["status"] == "ORDER_STATUS_FAILED"]
    assert failed and "insufficient stock" in failed[0]["failure_reason"], got

    watched = walkthrough.calls("/WatchOrder")
    assert watched, "the walkthrough has no WatchOrder"
    last = watched[-1].orders()[-1]
    assert last["status"] in SETTLED
    assert all(o["status"] == "ORDER_STATUS_PENDING" for o in watched[-1].orders()[:-1])

    by_customer = [s for s in walkthrough.calls("/ListOrders") if "customer_id" in s.command.payload()]
    assert by_customer, "the walkthrough lists no orders by customer"
    listed = by_customer[0].orders()
    customer = by_customer[0].command.payload()["customer_id"]
    assert {o["customer_id"] for o in listed} == {customer}
    assert order_id in [o["order_id"] for o in listed]
    positions = [(o["create_time"], o["order_id"]) for o in listed]
    assert positions == sorted(positions, reverse=True), "ListOrders is newest first"

    [cancel] = walkthrough.calls("/CancelOrder")
    assert cancel.orders()[0]["status"] == "ORDER_STATUS_CANCELLED"
    after_cancel = walkthrough.steps[walkthrough.steps.index(cancel) :]
    stock_after = [s for s in after_cancel if s.command.target.endswith("/GetStock")]
    assert stock_after, "the walkthrough does not show the stock after the cancel"
    restored = stock_after[-1].documents[0]
    assert (restored["sku"], restored["available"], restored["reserved"]) == (sku, initial["available"], "0")

    checks = walkthrough.calls("grpc.health.v1.Health/Check")
    assert checks and all(s.documents[0]["status"] == "SERVING" for s in checks)
