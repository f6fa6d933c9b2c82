"""Settings from flags over `ORDERS_*` variables over defaults; a bad value exits 2 with one line."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import pytest

from server.config import DEFAULT_DATABASE_URL, TESTING_FAULTS_ENV, Settings, load

FIELD_NAMES = [f.name for f in dataclasses.fields(Settings)]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "ORDERS_" + name.upper()


def _exit_line(capsys: pytest.CaptureFixture[str], argv: Sequence[str], env: Mapping[str, str]) -> str:
    """Run `load`, expect exit status 2, and return the one line it wrote to stderr."""
    with pytest.raises(SystemExit) as raised:
        load(list(argv), env=env)
    assert raised.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n")
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_empty_environment_and_no_flags_give_the_defaults() -> None:
    command, settings = load([], env={})
    assert command == "serve"
    assert settings == Settings()


def test_documented_defaults_match_api_md() -> None:
    _, settings = load([], env={})
    assert settings.host == "127.0.0.1"
    assert settings.port == 50051
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.database_url.startswith("sqlite:///var/")
    assert settings.inventory_database_url == ""
    assert settings.inventory_url == settings.database_url
    assert settings.metrics_port == 0
    assert settings.max_receive_message_bytes == 4 * 1024 * 1024


def test_migrate_is_a_command() -> None:
    command, _ = load(["migrate"], env={})
    assert command == "migrate"


def test_unrelated_environment_variables_are_ignored() -> None:
    _, settings = load([], env={"PORT": "1", "HOST": "0.0.0.0", "orders_port": "2"})
    assert settings == Settings()


# (setting, default, environment value, its parsed form, flag value, its parsed form)
OVERRIDES = [
    ("host", "127.0.0.1", "0.0.0.0", "0.0.0.0", "::1", "::1"),
    ("port", 50051, "6000", 6000, "7000", 7000),
    ("metrics_port", 0, "9100", 9100, "9200", 9200),
    (
        "database_url",
        DEFAULT_DATABASE_URL,
        "postgresql://u@h/env",
        "postgresql://u@h/env",
        "sqlite:///flag.db",
        "sqlite:///flag.db",
    ),
    (
        "inventory_database_url",
        "",
        "sqlite:///inv-env.db",
        "sqlite:///inv-env.db",
        "postgresql+psycopg2://u@h/inv",
        "postgresql+psycopg2://u@h/inv",
    ),
    ("grace_period_s", 10.0, "2.5", 2.5, "0.25", 0.25),
    ("log_format", "text", "json", "json", "text", "text"),
    ("log_level", "INFO", "DEBUG", "DEBUG", "ERROR", "ERROR"),
    ("db_pool_size", 0, "12", 12, "3", 3),
    ("inventory_rate", "1000/second", "10/minute", "10/minute", "5 per second", "5 per second"),
    ("page_token_secret", "orders-page-tokens", "from-env", "from-env", "from-flag", "from-flag"),
    ("cpu_affinity", "auto", "none", "none", "0", "0"),
]


@pytest.mark.parametrize(
    ("name", "default", "env_raw", "env_value", "flag_raw", "flag_value"),
    OVERRIDES,
    ids=[row[0] for row in OVERRIDES],
)
def test_flag_wins_over_environment_which_wins_over_default(
    name: str, default: object, env_raw: str, env_value: object, flag_raw: str, flag_value: object
) -> None:
    env = {_env(name): env_raw}
    assert getattr(load([], env={})[1], name) == default
    assert getattr(load([], env=env)[1], name) == env_value
    assert getattr(load([_flag(name), flag_raw], env=env)[1], name) == flag_value
    assert getattr(load([_flag(name), flag_raw], env={})[1], name) == flag_value


def test_inventory_url_defaults_to_the_orders_database() -> None:
    _, settings = load(["--database-url", "postgresql://u@h/orders"], env={})
    assert settings.inventory_url == "postgresql://u@h/orders"


def test_pool_size_zero_is_sized_from_the_thread_counts() -> None:
    _, settings = load(["--max-workers", "10", "--saga-workers", "3"], env={})
    assert settings.pool_size() == 10 + 3 + 4
    assert load(["--db-pool-size", "7"], env={})[1].pool_size() == 7


@pytest.mark.parametrize(
    "url", ["postgresql://u@h/orders", "postgres://u@h/orders", "postgresql+psycopg2://u@h/o"]
)
def test_saga_processes_take_any_spelling_of_postgresql_and_leave_the_port_processes_no_saga(
    url: str,
) -> None:
    _, settings = load(["--database-url", url, "--saga-processes", "2", "--saga-workers", "3"], env={})
    assert settings.supervised
    assert settings.sagas_here == 0  # a --workers process of the pool; a saga process has 0 of them
    assert settings.pool_size() == settings.max_workers + 4
    _, saga_process = load(["--database-url", url, "--saga-workers", "3"], env={})
    assert saga_process.sagas_here == 3


def test_settings_are_frozen() -> None:
    _, settings = load([], env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


@pytest.fixture
def help_text(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as raised:
        load(["--help"], env={})
    assert raised.value.code == 0
    # argparse wraps lines; compare with the wrapping undone.
    return " ".join(capsys.readouterr().out.split())


TESTING_ONLY = ("fault_file", "otel_test_span_file")


@pytest.mark.parametrize("name", [name for name in FIELD_NAMES if name not in TESTING_ONLY])
def test_help_lists_every_setting_with_its_flag_and_environment_variable(help_text: str, name: str) -> None:
    assert f"{_flag(name)} " in help_text
    assert f"[env {_env(name)}]" in help_text


def test_the_fault_switch_is_not_offered_to_production_users(
    help_text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "--fault-file" not in help_text
    with pytest.raises(SystemExit) as refused:
        load(["--fault-file", "faults.json"], env={})
    assert refused.value.code == 2
    assert "--fault-file: fault injection is for tests only" in capsys.readouterr().err
    _, settings = load(["--fault-file", "faults.json"], env={TESTING_FAULTS_ENV: "1"})
    assert settings.fault_file == "faults.json"


def test_the_tests_span_file_is_not_offered_to_production_users(
    help_text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "--otel-test-span-file" not in help_text
    with pytest.raises(SystemExit) as refused:
        load(["--otel-test-span-file", "spans.jsonl"], env={})
    assert refused.value.code == 2
    assert "--otel-test-span-file: for tests only" in capsys.readouterr().err
    _, settings = load(["--otel-test-span-file", "spans.jsonl"], env={TESTING_FAULTS_ENV: "1"})
    assert settings.tracing


def test_tracing_is_off_unless_an_exporter_is_chosen() -> None:
    assert not load([], env={})[1].tracing
    assert load(["--otel-exporter", "console"], env={})[1].tracing
    assert load([], env={"ORDERS_OTEL_EXPORTER": "otlp"})[1].tracing


def test_the_otlp_exporter_refuses_a_protocol_it_does_not_speak(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        load(["--otel-exporter", "otlp"], env={"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert refused.value.code == 2
    assert "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf" in capsys.readouterr().err
    grpc_first = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    assert load(["--otel-exporter", "otlp"], env=grpc_first)[1].otel_exporter == "otlp"


def test_help_lists_the_migrate_command(help_text: str) -> None:
    assert "migrate" in help_text


BAD_VALUES = [
    # argv, env, what the line must name
    pytest.param(["--db-pool-size", "-1"], {}, "--db-pool-size", id="negative-pool-size"),
    pytest.param([], {"ORDERS_DB_POOL_SIZE": "-1"}, "--db-pool-size", id="negative-pool-size-env"),
    pytest.param(["--port", "70000"], {}, "--port", id="port-70000"),
    pytest.param([], {"ORDERS_PORT": "70000"}, "--port", id="port-70000-env"),
    pytest.param(["--port", "-1"], {}, "--port", id="negative-port"),
    pytest.param(["--metrics-port", "65536"], {}, "--metrics-port", id="metrics-port-65536"),
    pytest.param(["--database-url", "mysql://u@h/orders"], {}, "--database-url", id="mysql"),
    pytest.param(
        [],
        {"ORDERS_INVENTORY_DATABASE_URL": "mysql://u@h/inv"},
        "--inventory-database-url",
        id="mysql-inventory-env",
    ),
    pytest.param(["--database-url", "sqlite://"], {}, "--database-url", id="sqlite-in-memory"),
    pytest.param(["--database-url", "not a url"], {}, "--database-url", id="not-a-url"),
    pytest.param(["--inventory-rate", "lots"], {}, "--inventory-rate", id="rate-words"),
    pytest.param([], {"ORDERS_INVENTORY_RATE": "10/fortnight"}, "--inventory-rate", id="rate-unit-env"),
    pytest.param([], {"ORDERS_PORT": "abc"}, "ORDERS_PORT", id="non-numeric-env-int"),
    pytest.param([], {"ORDERS_GRACE_PERIOD_S": "soon"}, "ORDERS_GRACE_PERIOD_S", id="non-numeric-env-float"),
    pytest.param([], {"ORDERS_MAX_WORKERS": ""}, "ORDERS_MAX_WORKERS", id="empty-env-int"),
    pytest.param(["--port", "abc"], {}, "--port", id="non-numeric-flag"),
    pytest.param(["--max-workers", "0"], {}, "--max-workers", id="zero-workers"),
    pytest.param(["--grace-period-s", "0"], {}, "--grace-period-s", id="zero-grace"),
    pytest.param(["--retry-base-s", "nan"], {}, "--retry-base-s", id="nan-delay"),
    pytest.param(["--log-level", "verbose"], {}, "--log-level", id="flag-outside-choices"),
    pytest.param(["--redis-url", "http://cache:6379"], {}, "--redis-url", id="redis-scheme"),
    pytest.param(["--redis-socket-timeout-s", "0"], {}, "--redis-socket-timeout-s", id="zero-redis-timeout"),
    pytest.param(
        [], {"ORDERS_REDIS_CONNECT_TIMEOUT_S": "-1"}, "--redis-connect-timeout-s", id="negative-redis-connect"
    ),
    pytest.param(["--redis-retry-s", "0"], {}, "--redis-retry-s", id="zero-redis-retry"),
    pytest.param(["--no-such-flag"], {}, "--no-such-flag", id="unknown-flag"),
    pytest.param(["--events-url", "http://127.0.0.1:4222"], {}, "--events-url", id="events-scheme"),
    pytest.param(
        ["--events-url", "nats://a:4222, redis://b"], {}, "--events-url", id="events-one-bad-server"
    ),
    pytest.param(["--events-stream", "orders.v1"], {}, "--events-stream", id="events-stream-dot"),
    pytest.param(
        ["--events-subject-prefix", "orders.*"], {}, "--events-subject-prefix", id="events-wildcard"
    ),
    pytest.param(["--events-subject-prefix", "orders..v1"], {}, "--events-subject-prefix", id="events-empty"),
    pytest.param(["--events-workers", "-1"], {}, "--events-workers", id="events-negative-workers"),
    pytest.param(["--events-rate", "fast"], {}, "--events-rate", id="events-rate-words"),
    pytest.param(["--cpu-affinity", "fast"], {}, "--cpu-affinity", id="cpu-affinity-words"),
    pytest.param([], {"ORDERS_CPU_AFFINITY": "3-1"}, "--cpu-affinity", id="cpu-affinity-reversed-env"),
    pytest.param(["--cpu-affinity", "4096"], {}, "--cpu-affinity", id="cpu-affinity-not-allowed"),
    pytest.param(
        ["--events-url", "nats://127.0.0.1:4222", "--lease-s", "90"],
        {},
        "--events-duplicate-window-s",
        id="events-window-below-two-leases",
    ),
]


@pytest.mark.parametrize(("argv", "env", "names"), BAD_VALUES)
def test_bad_value_exits_2_with_one_line_naming_the_setting(
    capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str], names: str
) -> None:
    line = _exit_line(capsys, argv, env)
    assert line.startswith("orders-server: error: ")
    assert names in line


def test_several_bad_values_still_make_one_line_naming_each(capsys: pytest.CaptureFixture[str]) -> None:
    line = _exit_line(capsys, ["--port", "70000", "--db-pool-size", "-1"], {})
    assert "--port" in line
    assert "--db-pool-size" in line


def test_good_flag_rescues_an_out_of_range_environment_value() -> None:
    # A range check runs on the final value, so a good flag rescues a bad (but numeric) variable.
    _, settings = load(["--port", "6000"], env={"ORDERS_PORT": "70000"})
    assert settings.port == 6000


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"ORDERS_LOG_LEVEL": "verbose"}, "LOG"),
        ({"ORDERS_LOG_FORMAT": "xml"}, "LOG"),
        ({"ORDERS_MIGRATE_ON_START": "sometimes"}, "MIGRATE"),
    ],
    ids=["log-level", "log-format", "migrate-on-start"],
)
def test_environment_value_outside_the_choices_exits_2(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], names: str
) -> None:
    line = _exit_line(capsys, [], env)
    assert names in line.upper().replace("-", "_")
