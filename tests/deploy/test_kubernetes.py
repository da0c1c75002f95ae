"""deploy/kubernetes/: every manifest validated against the Kubernetes schemas (offline, strict),
every YAML file in deploy/ linted, and the manifests kept consistent with the worker's config."""

from __future__ import annotations

import subprocess
import tomllib
from typing import Any

import pytest
from conftest import require_tool
from deploytools import REPO

from minicelery.keys import QueueKeys

yaml = pytest.importorskip("yaml", reason="PyYAML comes with yamllint: pip install -e '.[deploy]'")

KUBE = REPO / "deploy" / "kubernetes"
CONFIG = REPO / "config" / "tasks.toml"


def manifests() -> dict[str, dict[str, Any]]:
    """kind/name -> resource, for every resource the kustomization lists."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    found = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((KUBE / name).read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def test_every_yaml_file_passes_yamllint() -> None:
    yamllint = require_tool("yamllint", "pip install yamllint")
    files = sorted(str(p) for p in (REPO / "deploy").rglob("*.y*ml"))
    assert len(files) >= 10
    run = subprocess.run([yamllint, "--strict", "-c", str(REPO / ".yamllint"), *files], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_manifests_pass_strict_schema_validation() -> None:
    validate = require_tool("kubernetes-validate", "pip install kubernetes-validate")
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "kustomization.yaml and the directory disagree"
    run = subprocess.run(
        [validate, "--strict", *(str(KUBE / n) for n in sorted(listed))], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # Core kinds must really be checked; only the CRDs (no schema offline) may be skipped.
    unchecked = [line for line in run.stdout.splitlines() if "Couldn't find schema" in line]
    assert all(("ServiceMonitor" in line) or ("keda.sh" in line) for line in unchecked), unchecked
    assert run.stdout.count("passed for resource") == 5


def test_manifests_match_the_worker_config_and_its_shutdown() -> None:
    found = manifests()
    config = tomllib.loads(CONFIG.read_text())
    assert found["ConfigMap/minicelery-config"]["data"]["tasks.toml"] == CONFIG.read_text()

    pod = found["Deployment/minicelery-worker"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config["worker"]["shutdown_grace"]
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    (worker,) = pod["containers"]
    security = worker["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker["ports"][0]["containerPort"] == config["metrics"]["port"]
    assert worker["resources"]["requests"] and worker["resources"]["limits"]["memory"]
    env = {e["name"]: e["value"] for e in worker["env"]}
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    assert env["MINICELERY_REDIS__PASSWORD_FILE"].startswith(mounts["redis-password"] + "/")
    assert "redis-password" in found["Secret/minicelery-redis"]["stringData"]

    # The scrape job is named after the Service: alerts.yml expects job="minicelery".
    assert "Service/minicelery" in found and 'job="minicelery"' in (REPO / "deploy/prometheus/alerts.yml").read_text()
    scaler = found["ScaledObject/minicelery-worker"]["spec"]
    assert scaler["scaleTargetRef"]["name"] == "minicelery-worker" and scaler["minReplicaCount"] >= 1
    trigger = scaler["triggers"][0]["metadata"]
    assert trigger["listName"] == QueueKeys(config["worker"]["queues"][0]).ready
    selector = found["Deployment/minicelery-worker"]["spec"]["selector"]["matchLabels"]
    assert found["PodDisruptionBudget/minicelery-worker"]["spec"]["selector"]["matchLabels"] == selector
    assert found["Service/minicelery"]["spec"]["selector"] == selector
