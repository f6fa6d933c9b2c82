"""The client distribution orders-service-api (generated/), as a client installs and uses it.

- The README's Python example, read from README.md between its markers, runs against a real
  `orders-server` process: placed, got, its correlation id echoed.
- The package builds as a wheel (`pip wheel --no-deps ./generated`), and installs into a fresh
  virtual environment that gets nothing else but what the wheel asks for (grpcio and protobuf, at
  the versions of constraints.txt): no SQLAlchemy, no server. The same README example runs there.
- It is typed: mypy --strict, run on code that uses the installed wheel, accepts the example and
  rejects a wrong field type and a stub built without its channel; `mypy.stubtest` finds the
  services' stubs (which gen_protos.py writes) in step with the module grpcio-tools generates.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

from tests.local_services import ROOT
from tests.support import ServerProcess

pytestmark = pytest.mark.e2e

README = ROOT / "README.md"
START = "<!-- python-client:"
END = "<!-- end of python client -->"
README_ADDRESS = "127.0.0.1:50051"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# What the server's distribution brings and a client must not need.
SERVER_ONLY = {
    "orders-service",
    "sqlalchemy",
    "alembic",
    "psycopg2-binary",
    "limits",
    "pybreaker",
    "redis",
    "prometheus-client",
    "grpcio-health-checking",
    "grpcio-reflection",
    "grpcio-status",
}


def readme_example() -> str:
    """The ```python block between the README's python-client markers."""
    text = README.read_text()
    start, end = text.find(START), text.find(END)
    assert 0 <= start < end, f"README.md has no Python client example between {START!r} and {END!r}"
    blocks = re.findall(r"^```python\n(.*?)^```$", text[start:end], flags=re.M | re.S)
    assert len(blocks) == 1, "the README's client example is one ```python block"
    example = str(blocks[0])
    assert example.count(README_ADDRESS) == 1, f"the example calls {README_ADDRESS} once"
    return example


def run_example(python: str, address: str, cwd: Path) -> list[str]:
    """The example, pointed at `address`, run by `python` in `cwd`; its output lines."""
    script = cwd / "client_example.py"
    script.write_text(readme_example().replace(README_ADDRESS, address))
    # -I: no PYTHONPATH, no user site, not the script's folder's neighbours: only what is installed.
    done = subprocess.run(
        [python, "-I", str(script)],
        cwd=cwd,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def check_example_output(lines: list[str], server: ServerProcess) -> None:
    placed, got, error = lines
    match = re.fullmatch(rf"placed ({UUID}) ORDER_STATUS_PENDING (\S+)", placed)
    assert match, placed
    order_id, correlation_id = match.groups()
    assert re.fullmatch(rf"got {order_id} ORDER_STATUS_(PENDING|VALIDATED|FAILED)", got), got
    assert error.startswith("error INVALID_ARGUMENT "), error
    assert f"correlation_id={correlation_id} " in server.log()


def test_the_readme_python_example_runs_against_a_real_server(spawn_server, tmp_path):
    server = spawn_server()
    check_example_output(run_example(sys.executable, server.address, tmp_path), server)


def test_the_server_pins_the_client_package_it_is_built_with():
    client = tomllib.loads((ROOT / "generated" / "pyproject.toml").read_text())["project"]
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"{client['name']}=={client['version']}" in server["dependencies"]
    assert client["version"] == server["version"]


# --- the wheel in an environment of its own -------------------------------------------------


class ClientVenv:
    def __init__(self, folder: Path, wheel: Path) -> None:
        self.folder = folder
        self.wheel = wheel
        self.python = str(folder / "venv" / "bin" / "python")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.python, *args], cwd=self.folder, capture_output=True, text=True, timeout=600, check=False
        )


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> ClientVenv:
    """The client wheel built from a copy of generated/, installed into a fresh venv under constraints."""
    folder = tmp_path_factory.mktemp("client")
    # A copy: the build leaves build/ and *.egg-info behind, and LICENSE is a link out of generated/.
    source = folder / "generated"
    leftovers = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    shutil.copytree(ROOT / "generated", source, ignore=leftovers)
    wheel_command = ["wheel", "--no-deps", "--disable-pip-version-check", "-w", str(folder / "dist")]
    built = subprocess.run(
        [sys.executable, "-m", "pip", *wheel_command, str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (folder / "dist").glob("orders_service_api-*.whl")

    venv.create(folder / "venv", with_pip=True)
    environment = ClientVenv(folder, wheel)
    # The wheel's own requirements, at constraints.txt's versions (from pip's cache when it has them).
    installed = environment.run(
        "-m", "pip", "install", "--disable-pip-version-check", "-c", str(ROOT / "constraints.txt"), str(wheel)
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return environment


def test_the_wheel_holds_the_typed_package_and_installs_without_the_servers_dependencies(client_venv):
    listed = client_venv.run("-m", "pip", "list", "--format=json", "--disable-pip-version-check")
    names = {entry["name"].lower() for entry in json.loads(listed.stdout)}
    assert {"orders-service-api", "grpcio", "protobuf"} <= names
    assert not names & SERVER_ONLY, sorted(names & SERVER_ONLY)

    files = client_venv.run(
        "-I",
        "-c",
        "import importlib.metadata as m; print('\\n'.join(str(f) for f in m.files('orders-service-api')))",
    )
    shipped = set(files.stdout.split())
    for name in ("py.typed", "v1/orders_pb2.pyi", "v1/orders_pb2_grpc.pyi", "v1/orders_pb2_grpc.py"):
        assert f"orders_service_api/{name}" in shipped
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in shipped)

    code = "import orders_service_api.v1.orders_pb2_grpc, importlib.util as u; print(u.find_spec(%r))"
    imports = client_venv.run("-I", "-c", code % "sqlalchemy")
    assert (imports.returncode, imports.stdout) == (0, "None\n"), imports.stderr


def test_the_readme_example_runs_from_the_installed_wheel(client_venv, spawn_server):
    server = spawn_server()
    check_example_output(run_example(client_venv.python, server.address, client_venv.folder), server)


MYPY_CONFIG = """\
[mypy]
strict = True
# grpcio and protobuf ship no types (types-grpcio and types-protobuf have them); the package's own
# stubs are what is checked here.
[mypy-grpc.*,google.*]
ignore_missing_imports = True
"""

WRONG = """\
import grpc
from orders_service_api.v1 import orders_pb2, orders_pb2_grpc

request = orders_pb2.PlaceOrderRequest(customer_id=42)
stub = orders_pb2_grpc.OrderServiceStub()
"""


def mypy(client_venv: ClientVenv, name: str, code: str) -> subprocess.CompletedProcess[str]:
    """mypy --strict on `code`, finding packages in the client venv only (this venv's mypy)."""
    (client_venv.folder / "mypy.ini").write_text(MYPY_CONFIG)
    (client_venv.folder / name).write_text(code)
    options = ["--config-file", "mypy.ini", "--no-incremental", "--python-executable", client_venv.python]
    return subprocess.run(
        [sys.executable, "-m", "mypy", *options, name],
        cwd=client_venv.folder,
        env={k: v for k, v in os.environ.items() if k != "MYPYPATH"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_installed_package_is_typed_for_mypy_strict(client_venv):
    good = mypy(client_venv, "good.py", readme_example())
    assert good.returncode == 0, good.stdout + good.stderr

    wrong = mypy(client_venv, "wrong.py", WRONG)
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    wrong_type = r'wrong\.py:4: error: Argument "customer_id" to "PlaceOrderRequest" has incompatible type'
    assert re.search(wrong_type, wrong.stdout)
    assert re.search(r'wrong\.py:5: error: Missing positional argument "channel"', wrong.stdout)


MODULE = "orders_service_api.v1.orders_pb2_grpc"


def test_the_services_stubs_match_the_generated_module(tmp_path):
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG)
    done = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "--mypy-config-file", "mypy.ini", MODULE],
        cwd=tmp_path,
        # mypy reads the package from its source (an editable install is an import hook it cannot follow).
        env={**os.environ, "MYPYPATH": str(ROOT / "generated")},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
