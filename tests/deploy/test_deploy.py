"""Checks on deploy/: the compose file, the Kubernetes manifests, and the CLI they run.

The deploy files name things that live elsewhere: catalog models, ``corral`` subcommands
and options, queue names, settings. These tests hold them to the real ones, so a rename in
the code or a typo in a manifest fails here rather than in a cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from models.catalog import load_catalog

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yml"
K8S = DEPLOY / "k8s"
CATALOG = ROOT / "models" / "catalog.yaml"

# Variables compose must refuse to run without, and the message it must give.
REQUIRED_VARS = {
    "POSTGRES_PASSWORD": "set POSTGRES_PASSWORD to the password for the corral PostgreSQL user",
    "CORRAL_FLOWER_BASIC_AUTH": "set user:password for Flower",
}
# Images whose entrypoint is `corral` (deploy/Dockerfile, CPU and CUDA builds).
CORRAL_IMAGES = {"corral", "corral-cuda"}
# Options the deploy files pass that the CLI does not have yet. Each such invocation is an
# expected failure; strict, so this entry must go once the option exists.
# (subcommand, option) → why: options the deploy files use that the CLI does not have yet.
CLI_GAPS: dict[tuple[str, str], str] = {}
# Every role must be deployed by both compose and the Kubernetes manifests.
ROLES = {"api", "worker", "beat", "flower", "db upgrade", "models make-tiny"}


# ------------------------------------------------------------------------- helpers ----


def catalog_names() -> list[str]:
    return [entry.name for entry in load_catalog(CATALOG).entries]


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def is_corral_service(service: dict[str, Any]) -> bool:
    build = service.get("build") or {}
    return build.get("dockerfile") == "deploy/Dockerfile" and "entrypoint" not in service


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml"))


def k8s_docs() -> list[dict[str, Any]]:
    """Every object of the deployment (secret.yaml may be absent: its example stands in)."""
    docs = []
    for path in k8s_files():
        if path.name in ("kustomization.yaml", "secret.yaml"):
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def image_name(image: str) -> str:
    return image.rsplit("/", 1)[-1].split(":", 1)[0]


def corral_containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(doc)
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        if image_name(container["image"]) in CORRAL_IMAGES and "command" not in container:
            yield container


def option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in argv, None if absent."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def command_words(argv: list[str]) -> list[str]:
    """The subcommand path: the words before the first option."""
    words = []
    for arg in argv:
        if arg.startswith("-"):
            break
        words.append(arg)
    return words


def role(argv: list[str]) -> str:
    words = command_words(argv)
    return " ".join(words[:2]) if words[0] in ("db", "models", "keys") else words[0]


def corral_invocations() -> list[tuple[str, list[str]]]:
    """(where, argv after `corral`) for every corral process compose and k8s start."""
    found = []
    for name, service in compose_services().items():
        if is_corral_service(service):
            found.append((f"compose:{name}", [str(a) for a in service["command"]]))
    for doc in k8s_docs():
        if doc["kind"] in ("Deployment", "Job"):
            for container in corral_containers(doc):
                where = f"k8s:{doc['metadata']['name']}/{container['name']}"
                found.append((where, [str(a) for a in container["args"]]))
    return found


def worker_deployments() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """{deployment name: (deployment, its worker container)}."""
    workers = {}
    for doc in of_kind("Deployment"):
        for container in corral_containers(doc):
            if container["args"][0] == "worker":
                workers[doc["metadata"]["name"]] = (doc, container)
    return workers


def config_map() -> dict[str, str]:
    (cm,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "corral-config"]
    data: dict[str, str] = cm["data"]
    return data


def duration_s(text: str) -> float:
    """A compose duration ("31m", "1h30m", "90s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m app.cli.main ARGS`` with this interpreter (the project's venv)."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ---------------------------------------------------------------- corral commands ----


def _distinct(items: list[list[str]]) -> list[list[str]]:
    seen: dict[tuple[str, ...], list[str]] = {}
    for item in items:
        seen.setdefault(tuple(item), item)
    return list(seen.values())


def _subcommand_params() -> list[Any]:
    paths = _distinct([command_words(argv) for _, argv in corral_invocations()])
    return [pytest.param(p, id=" ".join(p)) for p in paths]


def _invocation_params() -> list[Any]:
    params = []
    for argv in _distinct([argv for _, argv in corral_invocations()]):
        gaps = [why for (sub, opt), why in CLI_GAPS.items() if argv[0] == sub and opt in argv]
        marks = [pytest.mark.xfail(reason=gaps[0], strict=True)] if gaps else []
        params.append(pytest.param(argv, id=" ".join(argv), marks=marks))
    return params


@pytest.mark.parametrize("words", _subcommand_params())
def test_subcommand_exists_in_the_cli(words: list[str]) -> None:
    result = run_cli(*words, "--help")
    assert result.returncode == 0, f"`corral {' '.join(words)}`: {result.stderr}"


@pytest.mark.parametrize("argv", _invocation_params())
def test_invocation_parses_in_the_cli(argv: list[str]) -> None:
    """The whole command line, options included: --help is eager, unknown options are not."""
    result = run_cli(*argv, "--help")
    assert result.returncode == 0, f"`corral {' '.join(argv)}`: {result.stderr}"


def test_cli_check_rejects_unknown_commands_and_options() -> None:
    assert run_cli("no-such-command", "--help").returncode != 0
    assert run_cli("worker", "--no-such-option", "1", "--help").returncode != 0


@pytest.mark.parametrize("source", ["compose", "k8s"])
def test_every_role_is_deployed(source: str) -> None:
    roles = {role(argv) for where, argv in corral_invocations() if where.startswith(source)}
    assert not ROLES - roles, f"{source} runs no {sorted(ROLES - roles)}"


# ------------------------------------------------------------------------- compose ----


@pytest.fixture(scope="module")
def docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker binary")
    probe = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip("docker has no compose plugin")
    return [docker, "compose"]


def compose_config(
    docker_compose: list[str], tmp_path: Path, variables: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`docker compose config` with exactly ``variables`` set (no .env, no outside values)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in REQUIRED_VARS and not k.startswith("COMPOSE_") and k != "CORRAL_LOG_LEVEL"
    }
    env.update(variables)
    empty = tmp_path / "empty.env"
    empty.write_text("")
    return subprocess.run(
        [
            *docker_compose,
            "--env-file",
            str(empty),
            "-f",
            str(COMPOSE),
            "--profile",
            "gpu",
            "config",
            "--format",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_config_succeeds_with_required_variables(
    docker_compose: list[str], tmp_path: Path
) -> None:
    result = compose_config(
        docker_compose,
        tmp_path,
        {"POSTGRES_PASSWORD": "pw-123", "CORRAL_FLOWER_BASIC_AUTH": "admin:fl-456"},
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == set(compose_services())
    url = "postgresql://corral:pw-123@postgres:5432/corral"
    for name, service in compose_services().items():
        if is_corral_service(service):
            assert services[name]["environment"]["CORRAL_DATABASE_URL"] == url, name
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pw-123"
    assert services["flower"]["environment"]["CORRAL_FLOWER_BASIC_AUTH"] == "admin:fl-456"


@pytest.mark.parametrize("missing", sorted(REQUIRED_VARS))
def test_compose_config_fails_naming_a_missing_variable(
    docker_compose: list[str], tmp_path: Path, missing: str
) -> None:
    given = {"POSTGRES_PASSWORD": "pw", "CORRAL_FLOWER_BASIC_AUTH": "admin:pw"}
    del given[missing]
    result = compose_config(docker_compose, tmp_path, given)
    assert result.returncode != 0
    assert missing in result.stderr
    assert REQUIRED_VARS[missing] in result.stderr


def test_compose_required_variables_have_no_defaults() -> None:
    text = COMPOSE.read_text()
    for var in REQUIRED_VARS:
        uses = re.findall(r"\$\{" + var + r"([^}]*)\}", text)
        assert uses, f"{var} is not used"
        for use in uses:
            assert use == f":?{REQUIRED_VARS[var]}", f"${{{var}{use}}}: use ${{{var}:?...}}"


def test_compose_api_healthcheck_hits_readyz() -> None:
    api = compose_services()["api"]
    probe = " ".join(api["healthcheck"]["test"])
    match = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)/readyz\b", probe)
    assert match, f"api healthcheck does not request /readyz: {probe}"
    assert match.group(1) == option(api["command"], "--port")


def test_compose_depends_on_waits_for_health_or_completion() -> None:
    services = compose_services()
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: use depends_on with conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            other = services[target]
            if "healthcheck" in other:
                wanted = "service_healthy"
            else:
                assert other.get("restart") == "no", (
                    f"{name} depends on {target}, which has no healthcheck and is no one-shot"
                )
                wanted = "service_completed_successfully"
            assert spec["condition"] == wanted, f"{name} -> {target}"


def test_compose_workers_serve_catalog_models() -> None:
    names = catalog_names()
    workers = {
        name: service
        for name, service in compose_services().items()
        if is_corral_service(service) and service["command"][0] == "worker"
    }
    assert workers, "compose runs no worker"
    for name, service in workers.items():
        argv = service["command"]
        env = service["environment"]
        model = option(argv, "--model")
        assert model in names, f"{name}: --model {model!r} is not in the catalog: {names}"
        assert any(v.split(":")[1] == env["CORRAL_MODELS_DIR"] for v in service["volumes"]), name
        # SIGTERM is a warm shutdown: the grace period must outlast the longest step.
        max_step_s = float(env["CORRAL_MAX_STEP_TIMEOUT_S"])
        assert duration_s(service["stop_grace_period"]) > max_step_s, name
        devices = (
            service.get("deploy", {})
            .get("resources", {})
            .get("reservations", {})
            .get("devices", [])
        )
        if option(argv, "--gpu") in (None, "none"):
            assert not devices, f"{name} runs on CPU but reserves a GPU"
        else:
            assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
            assert image_name(service["image"]) == "corral-cuda", name
            assert "-DGGML_CUDA=on" in service["build"]["args"]["CMAKE_ARGS"], name


# ---------------------------------------------------------------------- kubernetes ----


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: p.name)
def test_k8s_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), path.name
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], path.name


def test_kustomization_lists_every_manifest() -> None:
    resources = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    on_disk = {p.name for p in k8s_files()} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(resources) - {"secret.yaml"} == on_disk - {"secret.yaml"}
    assert "secret.yaml" in resources
    assert "secret.example.yaml" not in resources, "the example must never be deployed"


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("no kubectl binary")
    return path


def test_kustomize_builds_once_the_secret_exists(kubectl: str, tmp_path: Path) -> None:
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secret.yaml"))
    missing = subprocess.run(
        [kubectl, "kustomize", str(tree)], capture_output=True, text=True, check=False
    )
    assert missing.returncode != 0
    assert "secret.yaml" in missing.stderr
    shutil.copy(tree / "secret.example.yaml", tree / "secret.yaml")
    built = subprocess.run(
        [kubectl, "kustomize", str(tree)], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stderr
    objects = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert {d["metadata"].get("namespace") for d in objects if d["kind"] != "Namespace"} == {
        "corral"
    }


@pytest.mark.parametrize("name", sorted(worker_deployments()))
def test_k8s_worker_serves_a_catalog_model_and_scales_on_its_queue(name: str) -> None:
    deployment, container = worker_deployments()[name]
    argv = container["args"]
    model = option(argv, "--model")
    names = catalog_names()
    assert model in names, f"{name}: --model {model!r} is not in the catalog: {names}"

    scalers = [s for s in of_kind("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == name]
    assert len(scalers) == 1, f"{name} needs exactly one ScaledObject"
    spec = scalers[0]["spec"]
    triggers = [t for t in spec["triggers"] if t["type"] == "redis"]
    assert [t["metadata"]["listName"] for t in triggers] == [f"model.{model}"]
    meta = triggers[0]["metadata"]
    assert int(meta["listLength"]) >= 1
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["maxReplicaCount"] >= 1 and spec["cooldownPeriod"] > 0

    # KEDA must watch the Redis the workers consume from.
    redis = urlsplit(config_map()["CORRAL_REDIS_URL"])
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    host, port = meta["address"].rsplit(":", 1)
    assert host in (redis.hostname, f"{redis.hostname}.{namespace}.svc.cluster.local")
    assert int(port) == (redis.port or 6379)
    assert meta.get("databaseIndex", "0") == (redis.path.strip("/") or "0")

    # SIGTERM is a warm shutdown: the grace period must outlast the longest step.
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace > float(config_map()["CORRAL_MAX_STEP_TIMEOUT_S"])
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"

    gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
    if option(argv, "--gpu") in (None, "none"):
        assert gpus == 0, f"{name} runs on CPU but asks for a GPU"
    else:
        assert int(gpus) >= 1, f"{name} runs --gpu {option(argv, '--gpu')} without a GPU"
        assert image_name(container["image"]) == "corral-cuda"


def test_k8s_every_scaled_object_targets_a_worker() -> None:
    workers = worker_deployments()
    assert {"corral-worker-qwen2-5-7b", "corral-worker-tiny-chat"} <= set(workers)
    for scaler in of_kind("ScaledObject"):
        assert scaler["spec"]["scaleTargetRef"]["name"] in workers


def test_k8s_models_volume_is_shared() -> None:
    """The models Job writes the PVC; API (token counts) and workers read it."""
    models_dir = config_map()["CORRAL_MODELS_DIR"]
    claims = {d["metadata"]["name"] for d in of_kind("PersistentVolumeClaim")}
    users = 0
    for doc in [*of_kind("Deployment"), *of_kind("Job")]:
        volumes = {v["name"]: v for v in pod_spec(doc).get("volumes", [])}
        for container in corral_containers(doc):
            kind = role(container["args"])
            if kind not in ("api", "worker", "models make-tiny", "models pull"):
                continue
            users += 1
            where = f"{doc['metadata']['name']}/{container['name']}"
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == models_dir]
            claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims, where
            assert mount.get("readOnly", False) == (kind in ("api", "worker")), where
    assert users >= 4


def test_k8s_deployment_selectors_match_their_pods() -> None:
    for doc in of_kind("Deployment"):
        selector = doc["spec"]["selector"]["matchLabels"]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), doc["metadata"]["name"]


def test_k8s_api_probes_and_service() -> None:
    (api,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "corral-api"]
    (container,) = corral_containers(api)
    port = int(option(container["args"], "--port") or 0)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in ports.values()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == port, probe
    (service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == "corral-api"]
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    target = service["spec"]["ports"][0]["targetPort"]
    assert ports.get(target, target) == port


def test_k8s_beat_is_a_singleton() -> None:
    beats = [
        d
        for d in of_kind("Deployment")
        if any(c["args"][0] == "beat" for c in corral_containers(d))
    ]
    assert len(beats) == 1
    assert beats[0]["spec"]["replicas"] == 1
    assert beats[0]["spec"]["strategy"]["type"] == "Recreate"


def test_k8s_env_sources_exist() -> None:
    config_maps = {d["metadata"]["name"] for d in of_kind("ConfigMap")}
    secrets = {d["metadata"]["name"] for d in of_kind("Secret")}  # secret.example.yaml's
    for doc in [*of_kind("Deployment"), *of_kind("Job")]:
        for container in corral_containers(doc):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets
    for key in config_map():
        assert key.startswith("CORRAL_"), key
