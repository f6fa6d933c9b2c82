"""The server's distribution as a user meets it: `--version`, `python -m server`, the wheel's metadata.

Every check runs the real command (`orders-server`, `python -m server`, `pip wheel`) in a subprocess.
"""

from __future__ import annotations

import email
import importlib.metadata
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from email.message import Message
from pathlib import Path

import pytest

from tests.local_services import READY, ROOT, free_port
from tests.support import run_cli, server_env, wait_until

pytestmark = pytest.mark.e2e

PACKAGES = ("domain", "db", "saga", "application", "server")


def project(path: Path = ROOT / "pyproject.toml") -> dict[str, object]:
    return dict(tomllib.loads(path.read_text())["project"])


def python_m_server(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        env=server_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_version_prints_the_installed_distributions_version():
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"orders-server {importlib.metadata.version('orders-service')}\n"
    assert done.stdout.split()[1] == project()["version"]


def test_python_m_server_is_the_orders_server_command(tmp_path):
    for args in (["--version"], ["--help"], ["health", "--help"], ["--port", "-1"]):
        by_module, by_script = python_m_server(*args), run_cli(*args)
        assert (by_module.returncode, by_module.stdout, by_module.stderr) == (
            by_script.returncode,
            by_script.stdout,
            by_script.stderr,
        ), args
    unreachable = python_m_server("health", "--address", f"127.0.0.1:{free_port()}")
    assert unreachable.returncode == 3, unreachable.stderr

    # And it serves: the ready line, then a clean stop on SIGTERM.
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", "0"],
            env=server_env(),
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            ready = wait_until(lambda: READY.search(log.read_text()), timeout=30, what="the ready line")
            probe = run_cli("health", "--address", f"127.0.0.1:{ready['port']}")
            assert (probe.returncode, probe.stdout) == (0, "SERVING\n"), probe.stderr
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0, log.read_text()


def test_the_license_is_apache_2_and_the_client_package_ships_the_same_file():
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert (ROOT / "generated" / "LICENSE").read_text() == text
    assert project()["license"] == "Apache-2.0"
    assert project(ROOT / "generated" / "pyproject.toml")["license"] == "Apache-2.0"


def build_wheel(source: Path, out: Path) -> Path:
    """`pip wheel --no-deps` of a project, with build isolation as a user's build has it."""
    options = ["--no-deps", "--disable-pip-version-check", "-w", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", *options, str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [wheel] = out.glob("*.whl")
    return wheel


def metadata(wheel: zipfile.ZipFile) -> Message:
    [name] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(wheel.read(name))


def test_the_server_wheel_is_typed_licensed_classified_and_depends_on_the_client_package(tmp_path):
    # A copy of what the wheel is built from, so the build leaves nothing in the working tree.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))

    with zipfile.ZipFile(build_wheel(source, tmp_path / "dist")) as wheel:
        names = set(wheel.namelist())
        meta = metadata(wheel)
        license_files = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert len(license_files) == 1
        assert wheel.read(license_files[0]).decode() == (ROOT / "LICENSE").read_text()

    assert {f"{package}/py.typed" for package in PACKAGES} <= names
    assert {name.split("/")[0] for name in names if "/" in name and ".dist-info" not in name} == set(PACKAGES)
    assert meta["License-Expression"] == "Apache-2.0"
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")], "PEP 639: the expression only"
    client = project(ROOT / "generated" / "pyproject.toml")
    assert f"{client['name']}=={client['version']}" in (meta.get_all("Requires-Dist") or [])
    entry_points = set(project()["scripts"])  # type: ignore[call-overload]
    assert entry_points == {"orders-server"}
