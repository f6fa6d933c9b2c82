"""`orders-server health`, run as a container's HEALTHCHECK runs it, against real server processes.

Each probe is a real `orders-server health` process; what is checked is what a container engine or
a kubelet sees: the exit status, and the one line on stdout (SERVING) or stderr (why not).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from server.probe import CALL_FAILED, NOT_SERVING, SERVING, UNREACHABLE, USAGE
from tests.integration.test_tls_and_auth import Pki
from tests.local_services import ROOT, free_port
from tests.support import run_cli, server_env, wait_until

pytestmark = pytest.mark.e2e

TOKEN = "probe-secret-token"


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`orders-server health ARGS`, to its end, in an environment without the test's ORDERS_*."""
    return run_cli("health", *args, env=env, timeout=60)


def says(done: subprocess.CompletedProcess[str], status: int, pattern: str = "") -> None:
    """The probe exited `status` and said so in one line: SERVING on stdout, or the reason on stderr."""
    output = f"stdout: {done.stdout!r}\nstderr: {done.stderr!r}"
    assert done.returncode == status, output
    if status == SERVING:
        assert (done.stdout, done.stderr) == ("SERVING\n", ""), output
        return
    assert done.stdout == "", output
    assert done.stderr.startswith("orders-server health: ") and done.stderr.count("\n") == 1, output
    assert re.search(pattern, done.stderr), output


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    pki = Pki(tmp_path)
    for name, data in {"client.pem": pki.client_cert, "client.key": pki.client_key}.items():
        (tmp_path / name).write_bytes(data)
        pki.files[name] = str(tmp_path / name)
    return pki


# --- plaintext --------------------------------------------------------------------------------


def test_a_serving_server_passes_for_the_whole_server_and_for_its_services(spawn_server):
    server = spawn_server()

    says(probe("--address", server.address), SERVING)
    says(probe("--address", server.address, "--service", "orders.v1.OrderService"), SERVING)
    says(probe("--address", server.address, "--service", "no.such.Service"), NOT_SERVING, "unknown service")


def test_beside_the_server_it_finds_the_port_in_the_servers_own_variables(spawn_server):
    server = spawn_server()
    # As in the image: the server's ORDERS_HOST is a wildcard, its ORDERS_PORT the port; the probe
    # gets no flag at all.
    says(probe(env={"ORDERS_HOST": "0.0.0.0", "ORDERS_PORT": str(server.port)}), SERVING)
    says(probe(env={"ORDERS_PROBE_ADDRESS": server.address}), SERVING)


def test_a_draining_server_fails_the_probe_while_it_still_answers(spawn_server):
    # --shutdown-delay-s: after SIGTERM the server says NOT_SERVING but keeps answering for a while,
    # which is exactly what the probe must report (status 1, not "unreachable").
    server = spawn_server("--shutdown-delay-s", "5", "--grace-period-s", "1")
    says(probe("--address", server.address), SERVING)

    server.proc.send_signal(signal.SIGTERM)

    def failing() -> subprocess.CompletedProcess[str] | None:
        done = probe("--address", server.address)
        return done if done.returncode != SERVING else None

    draining = wait_until(failing, timeout=5, interval=0, what="the probe to fail after SIGTERM")
    says(draining, NOT_SERVING, r"127\.0\.0\.1:\d+: NOT_SERVING$")
    assert server.stop() == 0
    says(probe("--address", server.address), UNREACHABLE, "UNAVAILABLE")


def test_nothing_listening_is_unreachable_with_the_reason():
    address = f"127.0.0.1:{free_port()}"
    says(probe("--address", address), UNREACHABLE, rf"{address}: UNAVAILABLE: .*(?i:connection refused)")


def test_a_listener_that_never_answers_fails_within_the_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the kernel; nobody reads or writes
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        says(probe("--address", address, "--timeout-s", "0.5"), UNREACHABLE, r"no answer within 0\.5 s")


# --- TLS and mutual TLS -----------------------------------------------------------------------


def test_tls_with_the_ca_passes_and_without_trust_fails_the_handshake(spawn_server, pki, tmp_path):
    tls = ("--tls-cert-file", pki.files["server.pem"], "--tls-key-file", pki.files["server.key"])
    server = spawn_server(*tls)
    address = f"localhost:{server.port}"

    says(probe("--address", address, "--tls-ca-file", pki.files["ca.pem"]), SERVING)
    env = {"ORDERS_PROBE_ADDRESS": address, "ORDERS_PROBE_TLS_CA_FILE": pki.files["ca.pem"]}
    says(probe(env=env), SERVING)
    # Another CA, or grpc's default roots: the handshake fails and the line says whom it trusted.
    (tmp_path / "other").mkdir()
    other_ca = Pki(tmp_path / "other").files["ca.pem"]
    says(probe("--address", address, "--tls-ca-file", other_ca), UNREACHABLE, r"trusting --tls-ca-file\)")
    says(probe("--address", address, "--tls"), UNREACHABLE, r"\(TLS, trusting grpc's default root CAs\)")
    # Plaintext against TLS: no answer that makes sense.
    says(probe("--address", address), UNREACHABLE, "UNAVAILABLE")


def test_beside_a_tls_server_it_trusts_the_servers_own_certificate(spawn_server, pki):
    server_tls = {
        "ORDERS_TLS_CERT_FILE": pki.files["server.pem"],
        "ORDERS_TLS_KEY_FILE": pki.files["server.key"],
    }
    server = spawn_server(env=server_tls)

    # The probe in the server's environment: its port and certificate, nothing of its own.
    beside = {**server_tls, "ORDERS_PORT": str(server.port)}
    says(probe(env=beside), SERVING)
    # The certificate names localhost and 127.0.0.1, not this name: the pin holds, the name check fails.
    says(probe("--tls-server-name", "elsewhere.example", env=beside), UNREACHABLE, "ORDERS_TLS_CERT_FILE")
    says(probe("--tls-server-name", "localhost", env=beside), SERVING)


def test_mutual_tls_needs_the_probes_client_certificate(spawn_server, pki):
    server = spawn_server(
        "--tls-cert-file",
        pki.files["server.pem"],
        "--tls-key-file",
        pki.files["server.key"],
        "--tls-client-ca-file",
        pki.files["ca.pem"],
    )
    address = f"localhost:{server.port}"
    trust = ("--address", address, "--tls-ca-file", pki.files["ca.pem"])

    says(probe(*trust), UNREACHABLE, "UNAVAILABLE")
    identified = ("--tls-cert-file", pki.files["client.pem"], "--tls-key-file", pki.files["client.key"])
    says(probe(*trust, *identified), SERVING)
    env = {
        "ORDERS_PROBE_TLS_CERT_FILE": pki.files["client.pem"],
        "ORDERS_PROBE_TLS_KEY_FILE": pki.files["client.key"],
    }
    says(probe(*trust, env=env), SERVING)


# --- tokens -----------------------------------------------------------------------------------


class RequireToken(grpc.ServerInterceptor):  # type: ignore[misc]
    """What a gateway in front of a server may do: refuse every call without the token, health too."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}"
        self.seen: list[str | None] = []

    def intercept_service(self, continuation, handler_call_details):
        sent = dict(handler_call_details.invocation_metadata).get("authorization")
        self.seen.append(sent)
        if sent == self.expected:
            return continuation(handler_call_details)

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required")

        return grpc.unary_unary_rpc_method_handler(refuse)


@pytest.fixture
def gatekeeper() -> Iterator[tuple[str, RequireToken]]:
    """A real gRPC server with the standard health service behind a token check."""
    guard = RequireToken(TOKEN)
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[guard])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", guard
    server.stop(None)


def test_the_token_goes_out_as_a_bearer_token_from_the_environment_or_a_file(gatekeeper, tmp_path):
    address, guard = gatekeeper
    says(probe("--address", address), CALL_FAILED, "UNAUTHENTICATED: a bearer token is required")

    says(probe("--address", address, env={"ORDERS_PROBE_TOKEN": TOKEN}), SERVING)
    # The server's tokens-file format: comments skipped, the first token taken, its scopes ignored.
    token_file = tmp_path / "probe-token"
    token_file.write_text(f"# the probe's token\n{TOKEN} orders:read\nanother-token\n")
    says(probe("--address", address, "--token-file", str(token_file)), SERVING)
    says(probe("--address", address, "--token", TOKEN), SERVING)
    assert guard.seen == [None, f"Bearer {TOKEN}", f"Bearer {TOKEN}", f"Bearer {TOKEN}"]


def test_a_token_is_harmless_where_health_is_open_and_never_printed(spawn_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    server = spawn_server("--auth-tokens-file", str(tokens))

    says(probe("--address", server.address), SERVING)
    done = probe("--address", server.address, "--service", "nope", env={"ORDERS_PROBE_TOKEN": TOKEN})
    says(done, NOT_SERVING, "unknown service")
    assert TOKEN not in done.stderr + done.stdout


# --- usage, documentation, start-up -----------------------------------------------------------


def test_bad_usage_exits_2_with_one_line(tmp_path):
    missing = str(tmp_path / "missing.pem")
    for args, reason in [
        (("--tls-ca-file", missing), r"--tls-ca-file: cannot read .*missing\.pem"),
        (("--tls-cert-file", missing), "--tls-cert-file and --tls-key-file go together"),
        (("--timeout-s", "0"), "--timeout-s: must be greater than 0"),
        (("--no-such-option",), "unrecognized arguments: --no-such-option"),
        (("--token-file", str(tmp_path)), "--token-file: cannot read"),
    ]:
        done = probe(*args)
        assert done.returncode == USAGE, done
        assert done.stderr.count("\n") == 1 and re.search(reason, done.stderr), done.stderr


def test_help_documents_every_exit_status_and_every_variable():
    done = probe("--help")
    assert done.returncode == 0, done.stderr
    statuses = re.findall(r"^  ([0-9])  ", done.stdout.split("exit status:")[1], flags=re.M)
    assert statuses == ["0", "1", "2", "3", "4"]
    variables = ("ADDRESS", "SERVICE", "TIMEOUT_S", "TLS", "TLS_CA_FILE", "TLS_CERT_FILE", "TOKEN_FILE")
    words = " ".join(done.stdout.split())
    for variable in variables:
        assert f"[env ORDERS_PROBE_{variable}" in words
    # The server's --help points to it.
    assert "health" in run_cli("--help").stdout


def test_health_after_server_flags_is_refused_with_a_hint():
    done = run_cli("--port", "1", "health")
    assert done.returncode == 2
    assert "`health` comes first" in done.stderr


def test_the_probe_imports_no_database_config_or_service_code():
    # python -X importtime lists every module imported; a HEALTHCHECK every few seconds should not
    # pay for SQLAlchemy and the service.
    address = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "server", "health", "--address", address],
        env=server_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == UNREACHABLE, done.stderr
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", done.stderr, flags=re.M))
    assert "grpc" in imported
    heavy = {"sqlalchemy", "limits", "alembic", "psycopg2", "redis", "pybreaker", "prometheus_client"}
    ours = {"server.bootstrap", "server.config", "db", "saga", "application", "orders_service_api"}
    assert not imported & (heavy | ours), sorted(imported & (heavy | ours))

