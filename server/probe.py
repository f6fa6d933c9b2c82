"""`orders-server health`: ask a server's gRPC health service and exit 0 only while it answers SERVING.

Made for container HEALTHCHECKs and Kubernetes exec probes: it imports grpc and the health messages
only (no database, config or service code), makes one `grpc.health.v1.Health/Check` call with a
deadline, prints one line and exits with one of the statuses of `EXIT_STATUS` (also in `--help`).
Every failure writes one line on stderr that says why; success writes `SERVING` on stdout.

It talks like any client. Its own settings are flags and `ORDERS_PROBE_*` variables (a flag wins),
named after the server's: `--tls-cert-file`/`--tls-key-file` are this process's certificate, as they
are the server's own in the server. Beside a server in the same environment (a container) it also
follows the server's settings, so that a bare `orders-server health` works there:

- the address defaults to the server's `ORDERS_HOST`/`ORDERS_PORT`, with a wildcard host (0.0.0.0,
  ::) taken as the loopback address, else 127.0.0.1:50051 (the server's defaults);
- with `ORDERS_TLS_CERT_FILE` set (the server speaks TLS) and no `--tls-ca-file`, it speaks TLS and
  trusts exactly that certificate (a pin), which must then name the address it calls (127.0.0.1 by
  default: or set `--tls-server-name`). A server that wants client certificates
  (`ORDERS_TLS_CLIENT_CA_FILE`) needs `--tls-cert-file`/`--tls-key-file`: the probe never presents the
  server's own key.

Tokens go out as `authorization: Bearer <token>`, from `--token-file` (the first token of a file in
the server's tokens-file format, so one line with the token will do) or `ORDERS_PROBE_TOKEN`; a
`--token` flag exists too, but a token in a command line is visible to every user of the machine.
This server's health service needs no token; a proxy in front of it may.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import grpc

SERVING, NOT_SERVING, USAGE, UNREACHABLE, CALL_FAILED = 0, 1, 2, 3, 4
EXIT_STATUS = """\
exit status:
  0  SERVING
  1  the server answered, but not SERVING: NOT_SERVING (say, while it drains on SIGTERM or
     its database is down), UNKNOWN, or it does not know the service asked for
  2  bad usage: an unknown option, a file that cannot be read
  3  no answer: nothing listens, the TLS handshake failed, the server refused the connection
     or the call (UNAVAILABLE: shutting down), or no answer within the timeout
  4  the call failed with another status: UNAUTHENTICATED, PERMISSION_DENIED, UNIMPLEMENTED
     (no health service there), RESOURCE_EXHAUSTED, ...
"""
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", "50051"
# A wildcard the server listens on, and the loopback address that reaches it from the same host.
LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}
ENV = "ORDERS_PROBE_"


class UsageError(Exception):
    """A setting the probe cannot use; the message names it."""


@dataclass(frozen=True)
class Probe:
    address: str
    service: str
    timeout_s: float
    tls: bool
    ca: bytes | None  # None with TLS: the system's trusted roots
    ca_source: str
    client_cert: bytes | None
    client_key: bytes | None
    server_name: str
    token: str


def server_address(env: Mapping[str, str]) -> str:
    """Where the server of this environment listens, as seen from this host."""
    host = env.get("ORDERS_HOST", DEFAULT_HOST)
    host = LOOPBACK.get(host, host)
    port = env.get("ORDERS_PORT", DEFAULT_PORT)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line on stderr and exit status 2 (argparse would print the whole usage first)."""
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="orders-server health",
        description="Ask a server's gRPC health service (grpc.health.v1.Health/Check); exit 0 only while\n"
        "it answers SERVING. Every option is also an ORDERS_PROBE_* variable (a flag wins). Beside a\n"
        "server it follows the server's ORDERS_HOST, ORDERS_PORT and ORDERS_TLS_CERT_FILE.",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def option(flag: str, help: str, default: str = "", **kw: Any) -> None:
        variable = ENV + flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(flag, default=env.get(variable, default), help=f"{help} [env {variable}]", **kw)

    option(
        "--address",
        "host:port to call (default: the server's ORDERS_HOST:ORDERS_PORT, "
        f"else {DEFAULT_HOST}:{DEFAULT_PORT})",
        server_address(env),
    )
    option("--service", "service to ask about; empty = the whole server (default: '')")
    option("--timeout-s", "deadline of the whole probe, connecting included (default: 2)", "2", type=float)
    option(
        "--tls-ca-file",
        "PEM CA bundle that signed the server's certificate; turns TLS on (default: the server's "
        "ORDERS_TLS_CERT_FILE when set, else plaintext)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=env.get(ENV + "TLS") == "1",
        help="speak TLS, trusting grpc's default root CAs (or --tls-ca-file) [env ORDERS_PROBE_TLS=1]",
    )
    option("--tls-cert-file", "PEM client certificate (chain), for a server that requires one (mTLS)")
    option("--tls-key-file", "PEM private key of --tls-cert-file")
    option("--tls-server-name", "name the server's certificate must hold (default: the address's host)")
    option("--token-file", "file whose first token is sent as `authorization: Bearer <token>`")
    option("--token", "bearer token (prefer ORDERS_PROBE_TOKEN or --token-file: a flag shows in `ps`)")
    return parser


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"{flag}: cannot read {path!r}: {error.strerror or error}") from None


def configure(argv: Sequence[str], env: Mapping[str, str]) -> Probe:
    """The probe's settings from flags over `ORDERS_PROBE_*` over the server's variables."""
    args = build_parser(env).parse_args(argv)
    if args.timeout_s <= 0:
        raise UsageError("--timeout-s: must be greater than 0")
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        raise UsageError("--tls-cert-file and --tls-key-file go together")
    ca_file, ca_source = args.tls_ca_file, "--tls-ca-file"
    if not ca_file and not args.tls and env.get("ORDERS_TLS_CERT_FILE"):
        ca_file, ca_source = env["ORDERS_TLS_CERT_FILE"], "the server's certificate (ORDERS_TLS_CERT_FILE)"
    tls = bool(ca_file) or args.tls or bool(args.tls_cert_file)
    if not tls and args.tls_server_name:
        raise UsageError("--tls-server-name needs TLS (--tls-ca-file or --tls)")
    token = args.token
    if args.token_file:
        from server.auth import TokenFileError, parse_tokens  # the standard library only

        try:
            token = next(iter(parse_tokens(_read("--token-file", args.token_file).decode())))
        except (TokenFileError, UnicodeDecodeError) as error:
            raise UsageError(f"--token-file: {error}") from None
    return Probe(
        address=args.address,
        service=args.service,
        timeout_s=args.timeout_s,
        tls=tls,
        ca=_read("--tls-ca-file", ca_file) if ca_file else None,
        ca_source=ca_source if ca_file else "grpc's default root CAs",
        client_cert=_read("--tls-cert-file", args.tls_cert_file) if args.tls_cert_file else None,
        client_key=_read("--tls-key-file", args.tls_key_file) if args.tls_key_file else None,
        server_name=args.tls_server_name,
        token=token,
    )


def _channel(probe: Probe) -> grpc.Channel:
    import grpc

    if not probe.tls:
        return grpc.insecure_channel(probe.address)
    credentials = grpc.ssl_channel_credentials(probe.ca, probe.client_key, probe.client_cert)
    options = [("grpc.ssl_target_name_override", probe.server_name)] if probe.server_name else []
    return grpc.secure_channel(probe.address, credentials, options=options)


def check(probe: Probe) -> tuple[int, str]:
    """One Health/Check call: the exit status and the line that says what happened."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    what = f"{probe.address} service {probe.service!r}" if probe.service else probe.address
    metadata = (("authorization", f"Bearer {probe.token}"),) if probe.token else ()
    with _channel(probe) as channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=probe.service)
            reply = stub.Check(request, timeout=probe.timeout_s, metadata=metadata)
        except grpc.RpcError as error:
            code, details = error.code(), " ".join(str(error.details() or "").split())
            if code is grpc.StatusCode.NOT_FOUND:
                return NOT_SERVING, f"{what}: unknown service ({details})"
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return UNREACHABLE, f"{what}: no answer within {probe.timeout_s:g} s"
            if code is grpc.StatusCode.UNAVAILABLE:
                tls = f" (TLS, trusting {probe.ca_source})" if probe.tls else ""
                return UNREACHABLE, f"{what}{tls}: UNAVAILABLE: {details}"
            return CALL_FAILED, f"{what}: {code.name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return SERVING, status
    return NOT_SERVING, f"{what}: {status}"


def main(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    environment = os.environ if env is None else env
    try:
        probe = configure(argv, environment)
    except UsageError as error:
        print(f"orders-server health: error: {error}", file=sys.stderr)
        return USAGE
    # grpc's C core would print its own lines (a failed handshake, say) on stderr: the one line
    # below says it all. Read when grpc is first imported, so before that.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    status, line = check(probe)
    if status == SERVING:
        print(line)
    else:
        print(f"orders-server health: {line}", file=sys.stderr)
    return status
