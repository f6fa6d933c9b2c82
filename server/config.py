"""Settings: one frozen object, read once at start from flags and `ORDERS_*` environment variables.

Every field below is both a flag (`--database-url`) and a variable (`ORDERS_DATABASE_URL`); a flag
wins over the variable, the variable over the default. `orders-server --help` lists them all. A bad
value ends the process with exit status 2 and one line that names the setting.

Why one module of this size: one field per setting, with its help text and its checks, so that
`--help` and the checks cannot disagree with the fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from limits import parse as parse_rate
from sqlalchemy.engine import make_url

from db.backend import backend_of
from db.engine import UnsupportedDatabaseError, normalise_url
from server import affinity
from server.auth import TokenFileError, parse_tokens

DEFAULT_DATABASE_URL = "sqlite:///var/orders.db"
# Fault injection (server.faults) is for tests: `--fault-file` is refused, and left out of --help,
# unless the process runs with this variable set to 1.
TESTING_FAULTS_ENV = "ORDERS_TESTING_FAULTS"
# Public (it is in this file): fine for a demo, never for a deployment (a warning says so on PostgreSQL).
DEFAULT_PAGE_TOKEN_SECRET = "orders-page-tokens"


def _setting(default: Any, help: str, *, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Settings:
    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(50051, "gRPC port (0 = any free port, printed in the ready line)")
    workers: int = _setting(
        1,
        "server processes sharing the gRPC port (SO_REUSEPORT), each with its own dispatcher (none "
        "with --saga-processes); worker i (0 to N-1) serves metrics on metrics_port + i",
    )
    database_url: str = _setting(
        DEFAULT_DATABASE_URL,
        "orders database, any SQLAlchemy URL: sqlite:///path or postgresql[+psycopg2]://user@host/db",
    )
    inventory_database_url: str = _setting("", "inventory database URL (default: the orders database)")
    metrics_port: int = _setting(0, "Prometheus metrics HTTP port (0 = off)")
    migrate_on_start: str = _setting(
        "auto",
        "apply migrations at start: auto (SQLite only), always, never",
        choices=("auto", "always", "never"),
    )
    max_workers: int = _setting(16, "gRPC handler threads")
    max_concurrent_rpcs: int = _setting(
        64,
        "unary calls (health checks included) admitted at once, queued or running on the handler "
        "threads; more get RESOURCE_EXHAUSTED. Open streams do not count: they have caps of their own",
    )
    max_health_watch_streams: int = _setting(
        1000, "open Health/Watch streams at once (they hold no thread); more get RESOURCE_EXHAUSTED"
    )
    max_reflection_streams: int = _setting(
        32,
        "open server reflection streams at once, each holding a thread of a pool of this size; "
        "more get RESOURCE_EXHAUSTED",
    )
    max_watch_streams: int = _setting(
        256,
        "open WatchOrder streams at once (they hold no thread; each reads its order once a second "
        "besides its changes); more get RESOURCE_EXHAUSTED",
    )
    watch_max_lifetime_s: float = _setting(
        300.0,
        "a WatchOrder stream whose order has not settled by then ends with UNAVAILABLE: watch again",
    )
    keepalive_time_s: float = _setting(
        60.0, "seconds between the server's keepalive pings on a connection (with calls open or not)"
    )
    keepalive_timeout_s: float = _setting(
        20.0, "a connection whose keepalive ping is not answered within this is closed, its calls cut"
    )
    max_connection_idle_s: float = _setting(
        300.0, "a connection without a call for this long is sent GOAWAY (clients reconnect); 0 = never"
    )
    max_connection_age_s: float = _setting(
        1800.0,
        "a connection older than this is sent GOAWAY, so that clients spread to new instances; 0 = never",
    )
    max_connection_age_grace_s: float = _setting(
        30.0, "after that GOAWAY, how long the connection's calls may still run; then UNAVAILABLE"
    )
    max_receive_message_bytes: int = _setting(4 * 1024 * 1024, "largest request message accepted")
    tls_cert_file: str = _setting("", "PEM server certificate (chain); with --tls-key-file turns TLS on")
    tls_key_file: str = _setting("", "PEM private key of the server certificate")
    tls_client_ca_file: str = _setting(
        "", "PEM CA bundle: when set, clients must present a certificate it signed (mTLS)"
    )
    auth_tokens_file: str = _setting(
        "",
        "file of accepted bearer tokens, one per line, each optionally followed by its scopes "
        "(`TOKEN orders:read,orders:write`; none listed = every scope); when set, every service but "
        "health requires `authorization: Bearer <token>`",
    )
    grace_period_s: float = _setting(10.0, "on SIGTERM, how long calls in flight may take to finish")
    shutdown_delay_s: float = _setting(
        0.0, "on SIGTERM, seconds to keep serving after health turns NOT_SERVING (for load balancers)"
    )
    log_level: str = _setting("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = _setting("text", "log line format", choices=("text", "json"))
    otel_exporter: str = _setting(
        "none",
        "OpenTelemetry tracing: none (off: the trace SDK is not loaded), otlp (OTLP over gRPC "
        "to OTEL_EXPORTER_OTLP_ENDPOINT, default http://localhost:4317) or console (spans as JSON "
        "lines on stdout); the standard OTEL_* variables (OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, "
        "OTEL_RESOURCE_ATTRIBUTES, ...) set the rest. Needs the otel extra",
        choices=("none", "otlp", "console"),
    )
    otel_test_span_file: str = _setting(
        "",
        f"tests only, with {TESTING_FAULTS_ENV}=1: tracing on, and every finished span also written "
        "to this file as a JSON line",
    )
    db_pool_size: int = _setting(0, "database connections per engine (0 = sized from the thread counts)")
    db_statement_timeout_ms: int = _setting(
        10_000, "PostgreSQL statement_timeout when the call sets no deadline"
    )
    health_interval_s: float = _setting(2.0, "seconds between database health checks")
    page_token_secret: str = _setting(
        DEFAULT_PAGE_TOKEN_SECRET, "HMAC key of ListOrders page tokens (same on every instance)"
    )
    saga_workers: int = _setting(
        8, "saga executor threads (the bulkhead); 0 = this process does not dispatch"
    )
    saga_processes: int = _setting(
        0,
        "PostgreSQL: processes the supervisor runs beside the --workers ones that run the sagas and "
        "take no calls (each serves gRPC on a loopback port of its own); the --workers processes "
        "then run none, so the saga's work stays out of the calls' processes",
    )
    saga_process_nice: int = _setting(
        10, "CPU niceness of the --saga-processes processes (0-19): on a shared host the calls come first"
    )
    cpu_affinity: str = _setting(
        "auto",
        "CPUs each server process runs on: auto (one CPU per process, let go if other work crowds it), "
        "none (any), or a list such as 0,2-3",
    )
    poll_interval_s: float = _setting(1.0, "outbox poll interval, the safety net behind wake-ups")
    lease_s: float = _setting(30.0, "outbox claim lease; an event whose lease expires is re-run elsewhere")
    max_attempts: int = _setting(8, "failed attempts before an event is DEAD or its order FAILED")
    retry_base_s: float = _setting(0.5, "first retry delay (doubles each attempt, with jitter)")
    retry_max_s: float = _setting(60.0, "longest retry delay")
    saga_timeout_s: float = _setting(
        600.0, "a saga older than this fails its order ('inventory unavailable')"
    )
    breaker_fail_max: int = _setting(5, "consecutive failed or slow inventory calls that open the breaker")
    breaker_reset_s: float = _setting(5.0, "seconds the breaker stays open before a half-open probe")
    breaker_slow_call_s: float = _setting(2.0, "an inventory call slower than this counts as a failure")
    inventory_rate: str = _setting("1000/second", "rate limit of inventory calls, `limits` notation")
    redis_url: str = _setting("", "Redis URL for shared rate-limit counters and breaker state (optional)")
    redis_connect_timeout_s: float = _setting(0.5, "longest wait for a connection to Redis")
    redis_socket_timeout_s: float = _setting(
        0.5, "longest wait for a Redis answer; past it the guards count per process (see --redis-retry-s)"
    )
    redis_retry_s: float = _setting(
        5.0, "while Redis fails, seconds between tries to reach it again; meanwhile counting is per process"
    )
    outbox_retention_s: float = _setting(3600.0, "DONE outbox rows older than this are deleted")
    housekeeping_interval_s: float = _setting(5.0, "seconds between outbox clean-ups and backlog readings")
    events_url: str = _setting(
        "",
        "NATS server URL(s) of the event relay, comma-separated (nats://host:4222): every change of "
        "an order is published to JetStream; empty = off. Give every instance the same",
    )
    events_stream: str = _setting(
        "ORDERS",
        "JetStream stream of the events: created at start when missing (subjects <prefix>.>, the "
        "duplicate window and max age below), never changed once it exists",
    )
    events_subject_prefix: str = _setting(
        "orders.v1", "events go to <prefix>.<kind>: placed, validated, failed, cancelled, expired"
    )
    events_duplicate_window_s: float = _setting(
        120.0,
        "duplicate window of the stream the relay creates: JetStream drops a second message with "
        "the same event id within it (at least twice --lease-s)",
    )
    events_max_age_s: float = _setting(7 * 24 * 3600.0, "how long the stream the relay creates keeps events")
    events_workers: int = _setting(
        16, "event publishes in flight (the relay's workers); 0 = record changes but publish none here"
    )
    events_publish_timeout_s: float = _setting(
        2.0, "longest wait for JetStream's acknowledgement of a publish; past it the event is deferred"
    )
    events_rate: str = _setting("10000/second", "rate limit of event publishes, `limits` notation")
    fault_file: str = _setting(
        "", f"tests only, with {TESTING_FAULTS_ENV}=1: a JSON file of fault switches read at run time"
    )

    @property
    def security(self) -> str:
        """How the gRPC port talks, as the ready line says it."""
        if self.tls_client_ca_file:
            return "mutual tls"
        return "tls" if self.tls_cert_file else "plaintext"

    @property
    def tracing(self) -> bool:
        """OpenTelemetry tracing on (server.tracing): an exporter, or the tests' span file."""
        return self.otel_exporter != "none" or bool(self.otel_test_span_file)

    @property
    def sagas_here(self) -> int:
        """Saga executor threads this process runs: none where the settings ask for saga processes
        (the supervisor, and its workers on the port, which get its settings), else `saga_workers`
        (a saga process is started with `saga_processes` 0)."""
        return 0 if self.saga_processes > 0 else self.saga_workers

    @property
    def supervised(self) -> bool:
        """Started as a supervisor of worker processes (server.supervisor), not as one server."""
        return self.workers > 1 or self.saga_processes > 0

    @property
    def inventory_url(self) -> str:
        return self.inventory_database_url or self.database_url

    def pool_size(self) -> int:
        if self.db_pool_size:
            return self.db_pool_size
        # gRPC handlers + saga workers + the dispatcher's two round threads, health, housekeeping;
        # with the event relay, its workers (a deferral is a write), round threads, housekeeping.
        relay = self.events_workers + 3 if self.events_url else 0
        return self.max_workers + self.sagas_here + 4 + relay


def version() -> str:
    """The installed orders-service distribution's version (what `orders-server --version` prints)."""
    try:
        return importlib.metadata.version("orders-service")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (orders-service is not installed)"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "ORDERS_" + name.upper()


def environment(settings: Settings) -> dict[str, str]:
    """The `ORDERS_*` variables that give another process exactly these settings."""
    return {_env(f.name): str(getattr(settings, f.name)) for f in dataclasses.fields(Settings)}


def _convert(kind: type, raw: str) -> Any:
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    return raw


# Settings for tests only: refused, and left out of --help, unless TESTING_FAULTS_ENV is 1.
_TESTING_ONLY = frozenset({"fault_file", "otel_test_span_file"})
# Settings whose values must never be shown (URLs are shown with the password masked).
_SECRET = frozenset({"page_token_secret"})
_URLS = frozenset({"database_url", "inventory_database_url", "redis_url", "events_url"})


def shown(name: str, value: object) -> str:
    """A setting's value as it may appear in help text or logs."""
    if name in _SECRET:
        return "***" if value else "''"
    if name in _URLS and isinstance(value, str) and value:
        try:
            return make_url(value).render_as_string(hide_password=True)
        except Exception:
            return "***"
    return repr(value) if isinstance(value, str) else str(value)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.dest in _SECRET | _URLS:
            return f"{action.help} (default: {shown(action.dest, action.default)})"
        return str(super()._get_help_string(action))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line on stderr and exit status 2 (argparse would print the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="orders-server",
        description="Order-processing gRPC service. Every setting is also an ORDERS_* environment variable.",
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=("serve", "migrate", "admin", "health"),
        help="serve (default); migrate: apply the schema to the configured database(s) and exit; "
        "admin: operator commands (`orders-server admin` lists them); health: ask a running server "
        "whether it is SERVING, for container and Kubernetes probes (`orders-server health --help`)",
    )
    parser.add_argument("args", nargs="*", help="arguments of the admin command")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    hints = {f.name: f.type for f in dataclasses.fields(Settings)}
    for f in dataclasses.fields(Settings):
        kind = {"int": int, "float": float, "str": str}[str(hints[f.name])]
        default = f.default
        if _env(f.name) in env:
            try:
                default = _convert(kind, env[_env(f.name)])
            except ValueError:
                parser.error(f"{_env(f.name)}: invalid value {env[_env(f.name)]!r}")
            choices = f.metadata["choices"]
            if choices is not None and default not in choices:
                parser.error(f"{_env(f.name)}: {default!r} is not one of {', '.join(choices)}")
        hidden = f.name in _TESTING_ONLY and env.get(TESTING_FAULTS_ENV) != "1"
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            type=kind,
            default=default,
            choices=f.metadata["choices"],
            help=argparse.SUPPRESS if hidden else f"{f.metadata['help']} [env {_env(f.name)}]",
        )
    return parser


# Numeric settings and the values they allow: (names, test, what the error says).
_BOUNDS: tuple[tuple[tuple[str, ...], Callable[[float], bool], str], ...] = (
    (
        (
            "workers",
            "max_workers",
            "max_concurrent_rpcs",
            "max_health_watch_streams",
            "max_reflection_streams",
            "max_watch_streams",
            "max_receive_message_bytes",
            "max_attempts",
            "breaker_fail_max",
        ),
        lambda value: value >= 1,
        "must be at least 1",
    ),
    (
        (
            "db_pool_size",
            "db_statement_timeout_ms",
            "saga_workers",
            "events_workers",
            "shutdown_delay_s",
            "max_connection_idle_s",
            "max_connection_age_s",
            "max_connection_age_grace_s",
        ),
        lambda value: value >= 0,
        "must not be negative",
    ),
    (
        (
            "grace_period_s",
            "health_interval_s",
            "poll_interval_s",
            "lease_s",
            "retry_base_s",
            "retry_max_s",
            "saga_timeout_s",
            "watch_max_lifetime_s",
            "keepalive_time_s",
            "keepalive_timeout_s",
            "breaker_reset_s",
            "breaker_slow_call_s",
            "redis_connect_timeout_s",
            "redis_socket_timeout_s",
            "redis_retry_s",
            "housekeeping_interval_s",
            "outbox_retention_s",
            "events_duplicate_window_s",
            "events_max_age_s",
            "events_publish_timeout_s",
        ),
        lambda value: value > 0,
        "must be greater than 0",
    ),
)


def _check(settings: Settings) -> list[str]:
    problems: list[str] = []
    for name in ("port", "metrics_port"):
        if not 0 <= getattr(settings, name) <= 65535:
            problems.append(f"{_flag(name)}: must be a port number 0-65535")
    for names, allowed, rule in _BOUNDS:
        problems.extend(f"{_flag(name)}: {rule}" for name in names if not allowed(getattr(settings, name)))
    problems.extend(_check_workers(settings))
    for name in ("database_url", "inventory_database_url"):
        if getattr(settings, name):
            try:
                normalise_url(getattr(settings, name))
            except UnsupportedDatabaseError as error:
                problems.append(f"{_flag(name)}: {error}")
    try:
        if parse_rate(settings.inventory_rate).amount < 1:
            problems.append("--inventory-rate: must allow at least one call")
    except ValueError:
        problems.append(f"--inventory-rate: {settings.inventory_rate!r} is not a rate such as '100/second'")
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        problems.append("--tls-cert-file and --tls-key-file go together")
    if settings.tls_client_ca_file and not settings.tls_cert_file:
        problems.append("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file"):
        path = getattr(settings, name)
        if path and not os.path.isfile(path):
            problems.append(f"{_flag(name)}: no such file {path!r}")
    if settings.auth_tokens_file and os.path.isfile(settings.auth_tokens_file):
        try:
            parse_tokens(Path(settings.auth_tokens_file).read_text())
        except (TokenFileError, OSError, UnicodeDecodeError) as error:
            problems.append(f"--auth-tokens-file: {error}")
    if settings.redis_url and not settings.redis_url.startswith(("redis://", "rediss://", "unix://")):
        problems.append("--redis-url: must start with redis://, rediss:// or unix://")
    problems.extend(_check_events(settings))
    return problems


_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def _check_events(settings: Settings) -> list[str]:
    """The event relay's settings (checked whether it is on or not: a typo waits for no switch)."""
    problems = []
    servers = [server.strip() for server in settings.events_url.split(",") if server.strip()]
    if settings.events_url and importlib.util.find_spec("nats") is None:
        problems.append("--events-url: needs the nats-py package: pip install 'orders-service[events]'")
    if settings.events_url and (
        not servers or not all(server.startswith(("nats://", "tls://")) for server in servers)
    ):
        problems.append("--events-url: each server must start with nats:// or tls://")
    if not _STREAM_NAME.fullmatch(settings.events_stream):
        problems.append("--events-stream: 1-64 characters of A-Z, a-z, 0-9, _ and -")
    if not all(_SUBJECT_TOKEN.fullmatch(token) for token in settings.events_subject_prefix.split(".")):
        problems.append("--events-subject-prefix: dot-separated tokens of A-Z, a-z, 0-9, _ and -")
    if settings.events_url and settings.events_duplicate_window_s < 2 * settings.lease_s:
        problems.append(
            "--events-duplicate-window-s: must be at least twice --lease-s (an event whose relay died "
            "is published again once its lease runs out, and must still be a duplicate then)"
        )
    try:
        if parse_rate(settings.events_rate).amount < 1:
            problems.append("--events-rate: must allow at least one publish")
    except ValueError:
        problems.append(f"--events-rate: {settings.events_rate!r} is not a rate such as '1000/second'")
    return problems


def _check_tracing(settings: Settings, env: Mapping[str, str]) -> list[str]:
    """Tracing needs the otel extra, and the OTLP exporter here speaks gRPC only."""
    if not settings.tracing:
        return []
    if (
        importlib.util.find_spec("opentelemetry") is None
        or importlib.util.find_spec("opentelemetry.sdk") is None
    ):
        return ["--otel-exporter: needs the OpenTelemetry SDK: pip install 'orders-service[otel]'"]
    if settings.otel_exporter == "otlp":
        for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            wanted = env.get(name)
            if wanted and wanted != "grpc":
                return [f"{name}={wanted}: --otel-exporter otlp speaks OTLP over gRPC only (grpc)"]
            if wanted:
                break
    return []


def _notifies(url: str) -> bool:
    """The URL's database wakes other processes (`Backend.notifies`); a URL that is no database at
    all is reported on its own."""
    try:
        return backend_of(normalise_url(url).get_backend_name()).notifies
    except UnsupportedDatabaseError:
        return True


def _check_workers(settings: Settings) -> list[str]:
    """Several workers need SO_REUSEPORT, and one metrics port each above --metrics-port; saga
    processes need PostgreSQL (they wake each other through it) and saga workers to run."""
    problems = []
    if settings.saga_processes < 0:
        problems.append("--saga-processes: must not be negative")
    if not 0 <= settings.saga_process_nice <= 19:
        problems.append("--saga-process-nice: must be 0-19")
    problems.extend(affinity.check(settings.cpu_affinity, affinity.allowed_cpus()))
    if settings.saga_processes > 0:
        if not _notifies(settings.database_url):
            problems.append("--saga-processes: needs PostgreSQL (processes on one SQLite file only poll)")
        if settings.saga_workers < 1:
            problems.append("--saga-processes: needs --saga-workers of at least 1 (they run the sagas)")
    if not settings.supervised:
        return problems
    if not hasattr(socket, "SO_REUSEPORT"):
        problems.append("--workers: this platform has no SO_REUSEPORT; run one worker per port")
    processes = settings.workers + max(settings.saga_processes, 0)
    if settings.metrics_port and settings.metrics_port + processes - 1 > 65535:
        problems.append("--metrics-port: worker metrics ports (metrics_port + i) go past 65535")
    return problems


def load(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> tuple[str, Settings]:
    """Parse flags over environment over defaults; exits with status 2 and one line on a bad value."""
    command, _args, settings = parse(argv, env)
    return command, settings


def parse(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> tuple[str, list[str], Settings]:
    """`load`, plus the arguments that follow the command (only `admin` takes any)."""
    environment = os.environ if env is None else env
    parser = build_parser(environment)
    namespace = parser.parse_args(argv)
    if namespace.args and namespace.command != "admin":
        parser.error(f"unexpected arguments: {' '.join(namespace.args)}")
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(Settings)}
    settings = Settings(**values)
    problems = _check(settings)
    if settings.fault_file and environment.get(TESTING_FAULTS_ENV) != "1":
        problems.append(f"--fault-file: fault injection is for tests only (it needs {TESTING_FAULTS_ENV}=1)")
    if settings.otel_test_span_file and environment.get(TESTING_FAULTS_ENV) != "1":
        problems.append(f"--otel-test-span-file: for tests only (it needs {TESTING_FAULTS_ENV}=1)")
    problems.extend(_check_tracing(settings, environment))
    if problems:
        parser.error("; ".join(problems))
    return namespace.command, list(namespace.args), settings
