"""The Dockerfile, compose.yaml and the Kubernetes manifests in deploy/k8s/ agree with each other and
with the server: a non-root image whose HEALTHCHECK is the probe command, a one-shot migrate that
the three replicas wait for, probes on the server's port asking about services it publishes, and
only settings the server knows. (They read files only: the image itself was built and run by hand,
docs/operations.md says how.)"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from db.engine import normalise_url
from server import probe
from server.auth import parse_tokens
from server.bootstrap import INVENTORY_SERVICE, ORDER_SERVICE
from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_ENV = {"ORDERS_" + f.name.upper() for f in dataclasses.fields(Settings)}
HEALTH_SERVICES = {"", ORDER_SERVICE, INVENTORY_SERVICE}
PROBE = ["orders-server", "health"]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        if whole:
            keyword, _, arguments = whole.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def arguments_of(keyword: str) -> list[str]:
    return [arguments for name, arguments in dockerfile() if name == keyword]


def runtime_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, arguments in stage:
        if name == "ENV":
            for pair in arguments.split():
                key, _, value = pair.partition("=")
                values[key] = value
    return values


def healthcheck() -> tuple[dict[str, str], list[str]]:
    (arguments,) = arguments_of("HEALTHCHECK")
    options_part, _, command = arguments.partition("CMD ")
    options = dict(option.removeprefix("--").split("=", 1) for option in options_part.split())
    return options, json.loads(command)


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, duration
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def manifest_files() -> list[Path]:
    return sorted(p for p in (ROOT / "deploy" / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")


def manifests() -> dict[str, dict[str, Any]]:
    """The manifests of deploy/k8s by kind (one object of each kind)."""
    found: dict[str, dict[str, Any]] = {}
    for path in manifest_files():
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"{path.name}: a second {document['kind']}"
            found[document["kind"]] = document
    return found


def env_names(container: dict[str, Any]) -> set[str]:
    return {variable["name"] for variable in container.get("env", [])}


# ---- the Dockerfile ----


def test_the_base_image_is_a_build_argument_used_by_both_stages() -> None:
    instructions = dockerfile()
    assert instructions[0][0] == "ARG" and instructions[0][1].startswith("BASE_IMAGE=")
    stages = arguments_of("FROM")
    assert len(stages) == 2
    assert all(stage.startswith("${BASE_IMAGE} AS ") for stage in stages)


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    users = [arguments for name, arguments in runtime_stage() if name == "USER"]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_the_runtime_gets_the_built_environment_and_no_build_tools() -> None:
    stage = runtime_stage()
    assert ("COPY", "--from=build /opt/orders /opt/orders") in stage
    assert not [arguments for name, arguments in stage if name == "RUN" and "pip" in arguments]
    (build_run,) = [arguments for name, arguments in dockerfile() if "pip wheel" in arguments]
    assert "--constraint constraints.txt" in build_run
    assert "--no-index" in build_run
    assert "[dev" not in build_run and "[bench" not in build_run


def test_the_server_is_pid_1_listening_on_every_interface() -> None:
    (entrypoint,) = arguments_of("ENTRYPOINT")
    # Exec form (a JSON array): no shell in between to swallow SIGTERM.
    assert json.loads(entrypoint) == ["orders-server"]
    assert arguments_of("STOPSIGNAL") == ["SIGTERM"]
    environment = env_of(runtime_stage())
    assert environment["ORDERS_HOST"] == "0.0.0.0"
    assert arguments_of("EXPOSE") == [environment["ORDERS_PORT"]]


def test_the_healthcheck_is_the_probe_command_with_time_for_its_deadline() -> None:
    options, command = healthcheck()
    assert command == PROBE
    probe_deadline_s = build_probe_defaults()["timeout_s"]
    assert seconds(options["timeout"]) > probe_deadline_s


def build_probe_defaults() -> dict[str, Any]:
    return vars(probe.build_parser({}).parse_args([]))


def test_the_probe_finds_the_server_of_the_image_by_its_variables() -> None:
    environment = env_of(runtime_stage())
    assert probe.server_address(environment) == f"127.0.0.1:{environment['ORDERS_PORT']}"


# ---- compose.yaml ----


def test_compose_runs_migrate_once_and_three_servers_after_it() -> None:
    services = compose()["services"]
    migrate, orders = services["migrate"], services["orders"]

    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["healthcheck"] == {"disable": True}

    assert orders["deploy"]["replicas"] == 3
    assert orders["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for dependency in ("postgres", "redis"):
        assert orders["depends_on"][dependency]["condition"] == "service_healthy"
        assert services[dependency]["healthcheck"]["test"][0] == "CMD"


def test_compose_probes_the_servers_with_the_image_healthcheck() -> None:
    orders = compose()["services"]["orders"]
    options, command = healthcheck()
    assert orders["healthcheck"]["test"] == ["CMD", *command]
    assert orders["healthcheck"]["timeout"] == options["timeout"]


def test_compose_gives_the_servers_time_to_drain() -> None:
    orders = compose()["services"]["orders"]
    grace = float(orders["environment"]["ORDERS_GRACE_PERIOD_S"])
    delay = float(orders["environment"].get("ORDERS_SHUTDOWN_DELAY_S", 0))
    assert orders["stop_signal"] == "SIGTERM"
    assert seconds(orders["stop_grace_period"]) > grace + delay


def test_compose_publishes_the_port_the_image_listens_on_once_per_replica() -> None:
    (published,) = compose()["services"]["orders"]["ports"]
    host_ip, host_port, container_port = published.split(":")
    assert container_port == env_of(runtime_stage())["ORDERS_PORT"]
    # No fixed host port: three replicas cannot share one.
    assert (host_ip, host_port) == ("127.0.0.1", "")


def test_compose_sets_only_settings_the_server_knows() -> None:
    for name in ("migrate", "orders"):
        assert set(compose()["services"][name]["environment"]) <= SETTINGS_ENV, name


# ---- deploy/k8s ----


def test_the_kubernetes_example_has_every_part() -> None:
    kinds = set(manifests())
    assert kinds == {"Deployment", "Job", "PodDisruptionBudget", "Service", "Secret"}
    listed = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == [path.name for path in manifest_files()]


def deployment_container() -> dict[str, Any]:
    (container,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def env_value(container: dict[str, Any], name: str) -> str:
    (value,) = [variable["value"] for variable in container["env"] if variable["name"] == name]
    return str(value)


def test_the_probes_ask_the_server_port_about_services_it_publishes() -> None:
    container = deployment_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert str(ports["grpc"]) == env_value(container, "ORDERS_PORT")
    assert str(ports["metrics"]) == env_value(container, "ORDERS_METRICS_PORT")
    assert env_value(container, "ORDERS_HOST") == "0.0.0.0"
    grpc_probes = 0
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = container[kind]
        if "grpc" in check:
            grpc_probes += 1
            assert check["grpc"]["port"] == ports["grpc"], kind
            assert check["grpc"]["service"] in HEALTH_SERVICES, kind
        else:
            assert check["tcpSocket"]["port"] in ("grpc", ports["grpc"]), kind
    assert "grpc" in container["readinessProbe"]
    assert grpc_probes >= 1


def test_the_termination_grace_outlasts_the_drain() -> None:
    container = deployment_container()
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    drain = float(env_value(container, "ORDERS_SHUTDOWN_DELAY_S")) + float(
        env_value(container, "ORDERS_GRACE_PERIOD_S")
    )
    assert pod["terminationGracePeriodSeconds"] > drain


def test_the_service_and_the_budget_select_the_deployments_pods() -> None:
    found = manifests()
    labels = found["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert found["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert found["Service"]["spec"]["selector"].items() <= labels.items()
    assert found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = found["Service"]["spec"]["ports"]
    assert port["targetPort"] == "grpc"
    # A drain leaves at least two pods serving.
    replicas = found["Deployment"]["spec"]["replicas"]
    assert replicas - found["PodDisruptionBudget"]["spec"]["maxUnavailable"] >= 2


def test_the_job_migrates_with_the_same_image_and_database() -> None:
    found = manifests()
    (job,) = found["Job"]["spec"]["template"]["spec"]["containers"]
    assert job["args"] == ["migrate"]
    assert job["image"] == deployment_container()["image"]
    assert found["Job"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    database = [v for v in job["env"] if v["name"] == "ORDERS_DATABASE_URL"]
    assert database == [v for v in deployment_container()["env"] if v["name"] == "ORDERS_DATABASE_URL"]


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_pods_run_as_the_images_user_and_know_every_variable_they_set(kind: str) -> None:
    found = manifests()
    pod = found[kind]["spec"]["template"]["spec"]
    users = [arguments for name, arguments in runtime_stage() if name == "USER"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The Service `orders` would inject ORDERS_PORT=tcp://... into every pod of its namespace.
    assert pod["enableServiceLinks"] is False
    assert str(pod["securityContext"]["runAsUser"]) == users[-1].split(":")[0]
    secret_keys = set(found["Secret"]["stringData"])
    for container in pod["containers"]:
        assert env_names(container) <= SETTINGS_ENV
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        for variable in container["env"]:
            reference = variable.get("valueFrom", {}).get("secretKeyRef")
            if reference:
                assert reference["name"] == found["Secret"]["metadata"]["name"]
                assert reference["key"] in secret_keys


def test_the_example_secret_holds_values_the_server_accepts() -> None:
    values = manifests()["Secret"]["stringData"]
    assert parse_tokens(values["auth-tokens"])
    normalise_url(values["database-url"])
    assert values["redis-url"].startswith("redis://")
