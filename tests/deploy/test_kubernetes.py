"""deploy/kubernetes/: every manifest validated against the Kubernetes schemas (offline, strict),
every YAML file in deploy/ linted, and the manifests kept consistent with the worker's config."""

from __future__ import annotations

import re
import subprocess
import tomllib
from urllib.parse import urlsplit

import pytest
from conftest import require_tool
from deploytools import REPO, kube_manifests, kubelet_secret_file

from minicelery.keys import QueueKeys

yaml = pytest.importorskip("yaml", reason="PyYAML comes with yamllint: pip install -e '.[deploy]'")

KUBE = REPO / "deploy" / "kubernetes"
CONFIG = REPO / "config" / "container.toml"


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
    found = kube_manifests()
    # The ConfigMap is the image's config (config/container.toml), with the cluster's redis.url.
    mapped = found["ConfigMap/minicelery-config"]["data"]["tasks.toml"]
    url_line = re.compile(r"(?m)^url = .*$")
    assert url_line.sub("url = …", mapped) == url_line.sub("url = …", CONFIG.read_text())
    config = tomllib.loads(mapped)
    assert config["metrics"]["bind"] == "0.0.0.0" and config["metrics"]["port"] == 9808  # probes use it

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
    # The settings come from the ConfigMap alone: no variable overrides what it says.
    assert set(env) == {"MINICELERY_REDIS__PASSWORD_FILE", "MINICELERY_LOGGING__FORMAT"}, env
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    assert env["MINICELERY_REDIS__PASSWORD_FILE"].startswith(mounts["redis-password"] + "/")
    assert "redis-password" in found["Secret/minicelery-redis"]["stringData"]
    # The Secret's file as the kubelet writes it must be readable by the pod's user (not root).
    uid, gid, mode = kubelet_secret_file(pod, "redis-password")
    user, group = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    groups = {group, pod["securityContext"].get("fsGroup")}
    assert (uid == user and mode & 0o400) or (gid in groups and mode & 0o040) or mode & 0o004, (uid, gid, oct(mode))
    assert not mode & 0o007, "the password must not be world-readable"
    # KEDA owns the replica count: a replicas: field would reset it on every apply.
    assert "replicas" not in found["Deployment/minicelery-worker"]["spec"]

    # The scrape job is named after the Service: alerts.yml expects job="minicelery".
    assert "Service/minicelery" in found and 'job="minicelery"' in (REPO / "deploy/prometheus/alerts.yml").read_text()
    scaler = found["ScaledObject/minicelery-worker"]["spec"]
    assert scaler["scaleTargetRef"]["name"] == "minicelery-worker" and scaler["minReplicaCount"] >= 1
    trigger = scaler["triggers"][0]["metadata"]
    # KEDA cannot read the TOML: its address, database and list must repeat the ConfigMap's.
    url = urlsplit(config["redis"]["url"])
    assert trigger["address"] == f"{url.hostname}:{url.port or 6379}"
    assert trigger["databaseIndex"] == (url.path.strip("/") or "0")
    assert trigger["listName"] == QueueKeys(config["worker"]["queues"][0]).ready
    selector = found["Deployment/minicelery-worker"]["spec"]["selector"]["matchLabels"]
    assert found["PodDisruptionBudget/minicelery-worker"]["spec"]["selector"]["matchLabels"] == selector
    assert found["Service/minicelery"]["spec"]["selector"] == selector
