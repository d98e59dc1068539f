"""Every Kubernetes manifest under deploy/k8s/, validated offline against the schemas of a
pinned Kubernetes version.

Core objects (Deployment, Service, Job, ConfigMap, Secret, PersistentVolumeClaim,
Namespace) are validated by ``kubernetes-validate`` against the OpenAPI schemas it ships
for :data:`K8S_VERSION`, in strict mode: an unknown or misspelt field is an error, as it
is for ``kubectl apply`` (strict field validation). A kind without a core schema fails
here unless it is handled below on purpose:

- ``Kustomization`` (kustomize.config.k8s.io) is a build file for ``kubectl apply -k``,
  never sent to the API server: there is no schema to hold it to; it is skipped, by name.
  (tests/deploy/test_deploy.py checks what it lists and builds it with kubectl.)
- ``ScaledObject`` (keda.sh/v1alpha1) is KEDA's custom resource: its shape is checked
  against :data:`SCALED_OBJECT`, written here from KEDA 2.x's CRD and the documented
  parameters of its ``redis`` (lists) scaler, and the HorizontalPodAutoscaler KEDA makes
  from it is validated against the core autoscaling/v2 schema.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from kubernetes_validate.utils import all_versions  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The Kubernetes version the manifests are held to (kubernetes-validate ships its schemas).
K8S_VERSION = "1.33.0"

# Kinds that have no core schema, and what this module does with them instead.
SKIPPED = {
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): (
        "a kustomize build file read by `kubectl apply -k`, never an API object "
        "(test_deploy.py checks its resources and builds it with kubectl)"
    ),
}
KEDA = ("keda.sh/v1alpha1", "ScaledObject")

# ---------------------------------------------------------------- KEDA ScaledObject ----

_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STRING = {"type": "string", "minLength": 1}
_NUMBER_STRING = {"type": "string", "pattern": r"^[0-9]+$"}
_BOOL_STRING = {"enum": ["true", "false"]}
_DNS_LABELS = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

# keda.sh/v1alpha1 ScaledObject (KEDA 2.x CRD): the fields KEDA knows, no others.
SCALED_OBJECT: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": _DNS_LABELS,
                "namespace": _DNS_LABELS,
                "labels": _STRING_MAP,
                "annotations": _STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": _DNS_LABELS,
                        "kind": _STRING,
                        "apiVersion": _STRING,
                        "envSourceContainerName": _STRING,
                    },
                },
                "pollingInterval": _INT32,
                "cooldownPeriod": _INT32,
                "initialCooldownPeriod": _INT32,
                "idleReplicaCount": _INT32,
                "minReplicaCount": _INT32,
                "maxReplicaCount": _INT32,
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {"failureThreshold": _INT32, "replicas": _INT32},
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "scalingModifiers": {"type": "object"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": _STRING,
                                # The HPA's own behavior: checked against the core schema.
                                "behavior": {"type": "object"},
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": _STRING,
                            "name": _STRING,
                            "metadata": _STRING_MAP,  # map[string]string: numbers quoted
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {
                                    "name": _STRING,
                                    "kind": {
                                        "enum": [
                                            "TriggerAuthentication",
                                            "ClusterTriggerAuthentication",
                                        ]
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

# The `redis` (lists) scaler's metadata, as KEDA 2.x documents it.
REDIS_TRIGGER: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["listName"],
    "properties": {
        "address": {"type": "string", "pattern": r"^[^:\s]+:[0-9]+$"},
        "host": _STRING,
        "port": _NUMBER_STRING,
        "addressFromEnv": _STRING,
        "hostFromEnv": _STRING,
        "portFromEnv": _STRING,
        "usernameFromEnv": _STRING,
        "passwordFromEnv": _STRING,
        "listName": _STRING,
        "listLength": {"type": "string", "pattern": r"^[1-9][0-9]*$"},
        "activationListLength": _NUMBER_STRING,
        "databaseIndex": _NUMBER_STRING,
        "enableTLS": _BOOL_STRING,
        "unsafeSsl": _BOOL_STRING,
    },
    "anyOf": [
        {"required": ["address"]},
        {"required": ["host", "port"]},
        {"required": ["addressFromEnv"]},
        {"required": ["hostFromEnv", "portFromEnv"]},
    ],
}


def check_scaled_object(doc: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError (or kubernetes_validate.ValidationError) when the
    ScaledObject is not one KEDA 2.x accepts."""
    jsonschema.Draft202012Validator(SCALED_OBJECT).validate(doc)
    spec = doc["spec"]
    for trigger in spec["triggers"]:
        if trigger["type"] == "redis":
            jsonschema.Draft202012Validator(REDIS_TRIGGER).validate(trigger["metadata"])
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if not low <= high:
        raise jsonschema.ValidationError(f"minReplicaCount {low} > maxReplicaCount {high}")
    # KEDA drives an HPA (autoscaling/v2) with this behavior: it must be a valid one.
    target = spec["scaleTargetRef"]
    hpa: dict[str, Any] = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": f"keda-hpa-{doc['metadata']['name']}"},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": target.get("apiVersion", "apps/v1"),
                "kind": target.get("kind", "Deployment"),
                "name": target["name"],
            },
            "minReplicas": max(1, low),
            "maxReplicas": high,
        },
    }
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        hpa["spec"]["behavior"] = behavior
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


# ------------------------------------------------------------------------ manifests ----


def manifests() -> list[Path]:
    """Every YAML file in deploy/k8s (secret.yaml too where it exists: it is git-ignored)."""
    return sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml"))


def documents() -> list[tuple[str, dict[str, Any]]]:
    """(file:kind/name, object) for every document of every manifest."""
    found = []
    for path in manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                name = doc.get("metadata", {}).get("name", "")
                found.append((f"{path.name}:{doc['kind']}/{name}", doc))
    return found


def _params() -> list[Any]:
    params = []
    for where, doc in documents():
        why = SKIPPED.get((doc["apiVersion"], doc["kind"]))
        marks = [pytest.mark.skip(reason=f"{doc['kind']}: {why}")] if why else []
        params.append(pytest.param(doc, id=where, marks=marks))
    return params


def validate(doc: dict[str, Any]) -> None:
    if (doc["apiVersion"], doc["kind"]) == KEDA:
        check_scaled_object(doc)
        return
    # A kind without a schema raises SchemaNotFoundError: a failure, never a skip.
    validated = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert validated == re.sub(r"^(\d+\.\d+).*", r"\1", K8S_VERSION), validated


def test_the_pinned_kubernetes_version_is_shipped() -> None:
    assert K8S_VERSION in all_versions(), (
        f"kubernetes-validate {kubernetes_validate.__version__} ships no schemas for "
        f"Kubernetes {K8S_VERSION}: {all_versions()}"
    )


def test_every_manifest_is_covered() -> None:
    docs = documents()
    assert {p.name for p in manifests()} == {where.split(":")[0] for where, _ in docs}
    kinds = {doc["kind"] for _, doc in docs}
    # The deployment's core kinds are all here (validated, never skipped) ...
    assert {"Deployment", "Service", "Job", "ConfigMap", "Secret"} <= kinds, kinds
    assert {"PersistentVolumeClaim", "Namespace", "ScaledObject"} <= kinds, kinds
    # ... and the only kinds skipped are the ones named, with their reasons.
    skipped = {(d["apiVersion"], d["kind"]) for _, d in docs} & set(SKIPPED)
    assert skipped == {("kustomize.config.k8s.io/v1beta1", "Kustomization")}


@pytest.mark.parametrize("doc", _params())
def test_manifest_is_valid(doc: dict[str, Any]) -> None:
    validate(doc)


# ------------------------------------------------- the validators reject bad objects ----


def _doc(file: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for where, d in documents() if where.startswith(f"{file}:{kind}/")]
    return copy.deepcopy(doc)


def test_strict_validation_rejects_unknown_fields_and_wrong_types() -> None:
    deployment = _doc("api.yaml", "Deployment")
    validate(deployment)
    misspelt = copy.deepcopy(deployment)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["imagePulPolicy"] = container.pop("imagePullPolicy")
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePulPolicy"):
        validate(misspelt)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "2"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong_type)
    unknown_kind = {"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": {"name": "x"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate(unknown_kind)


# Ways to break a ScaledObject that KEDA (its CRD or its redis scaler) would refuse:
# (spec, the first trigger's metadata) -> None.
BREAKS: dict[str, Any] = {
    "unquoted number in the string map": lambda s, m: m.update(listLength=2),
    "unknown spec field": lambda s, m: s.update(maxReplicas=4),
    "no listName": lambda s, m: m.pop("listName"),
    "no Redis address": lambda s, m: m.pop("address"),
    "misspelt redis parameter": lambda s, m: m.update(listLenght="2"),
    "address without a port": lambda s, m: m.update(address="redis"),
    "min above max": lambda s, m: s.update(minReplicaCount=9),
    "no trigger": lambda s, m: s.update(triggers=[]),
}


def test_scaled_object_check_accepts_ours() -> None:
    validate(_doc("worker-qwen2-5-7b.yaml", "ScaledObject"))


@pytest.mark.parametrize("what", sorted(BREAKS))
def test_scaled_object_check_rejects_what_keda_would(what: str) -> None:
    doc = _doc("worker-qwen2-5-7b.yaml", "ScaledObject")
    BREAKS[what](doc["spec"], doc["spec"]["triggers"][0]["metadata"])
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


def test_scaled_object_hpa_behavior_is_held_to_the_core_schema() -> None:
    doc = _doc("worker-qwen2-5-7b.yaml", "ScaledObject")
    behavior = doc["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    policy = behavior["scaleDown"]["policies"][0]
    policy["period"] = policy.pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError, match="period"):
        validate(doc)
