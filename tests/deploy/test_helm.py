"""The Helm chart in deploy/helm/pgwarden, rendered by the real helm and read back: several
gateway replicas behind a Service, settings from a ConfigMap that pgwarden accepts, the
credentials and keys from Secrets, probes on the admin listener's /healthz and /readyz, the
PostgreSQL audit store shared by the replicas."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.control.targets import Target
from gateway.identity.signing_key import SIGNING_KEY_FILE

from .contract import setting_names, setting_of_env

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "pgwarden"


def _helm() -> str:
    for candidate in (
        os.environ.get("PGWARDEN_HELM_BINARY"),
        str(ROOT / ".pgwarden" / "bin" / "helm"),
        shutil.which("helm"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    raise RuntimeError("helm missing: run `make helm` (go install helm.sh/helm/v4/cmd/helm@v4.3.2)")


def render(*sets: str) -> dict[str, list[dict[str, Any]]]:
    """`helm template` of the chart: its objects by kind."""
    args = [_helm(), "template", "pgwarden", str(CHART)]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    objects: dict[str, list[dict[str, Any]]] = {}
    for doc in yaml.safe_load_all(out):
        if doc:
            objects.setdefault(doc["kind"], []).append(doc)
    return objects


@pytest.fixture(scope="module")
def chart() -> dict[str, list[dict[str, Any]]]:
    return render()


def _container(chart: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (sts,) = chart["StatefulSet"]
    containers: list[dict[str, Any]] = sts["spec"]["template"]["spec"]["containers"]
    (container,) = containers
    return container


def test_lint_passes() -> None:
    subprocess.run([_helm(), "lint", "--strict", str(CHART)], check=True, capture_output=True)


def test_replicas_behind_a_service(chart: dict[str, list[dict[str, Any]]]) -> None:
    (sts,) = chart["StatefulSet"]
    assert sts["spec"]["replicas"] >= 2
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in _container(chart)["ports"]}
    services = {s["metadata"]["name"]: s for s in chart["Service"]}
    assert sts["spec"]["serviceName"] in services
    client = services["pgwarden"]
    assert client["spec"]["selector"].items() <= pod_labels.items()
    (port,) = client["spec"]["ports"]
    assert port["targetPort"] in ports and port["port"] == ports["postgresql"] == 6543
    assert render("replicaCount=4")["StatefulSet"][0]["spec"]["replicas"] == 4
    (pdb,) = chart["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "PodDisruptionBudget" not in render("replicaCount=1")


def test_probes_on_the_admin_listener(chart: dict[str, list[dict[str, Any]]]) -> None:
    container = _container(chart)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["PGWARDEN_ADMIN__PORT"]) == ports["admin"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):  # fmt: skip
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, "admin"), probe
        # Off loopback the admin listener serves TLS only.
        assert get["scheme"] == "HTTPS"


def test_settings_from_a_configmap_pgwarden_accepts(
    chart: dict[str, list[dict[str, Any]]],
) -> None:
    (config,) = chart["ConfigMap"]
    container = _container(chart)
    args = container["args"]
    assert args[-1] == "serve" and args[0] == "--config"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_path = Path(args[1])
    volume = mounts[str(config_path.parent)]
    (sts,) = chart["StatefulSet"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes[volume]["configMap"]["name"] == config["metadata"]["name"]
    settings = tomllib.loads(config["data"][config_path.name])
    known = setting_names()
    for section, values in settings.items():
        names = {f"{section}.{k}" for k in values} if isinstance(values, dict) else {section}
        assert names <= known, names - known
    for e in container["env"]:
        if e["name"].startswith("PGWARDEN_"):
            assert setting_of_env(e["name"]) in known, e["name"]
    # The pod's grace period outlasts the preStop sleep and the drain.
    grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings["shutdown"]["drain_seconds"] + 5


def test_targets_are_a_registry_pgwarden_reads(chart: dict[str, list[dict[str, Any]]]) -> None:
    (config,) = chart["ConfigMap"]
    targets = [Target(**t) for t in json.loads(config["data"]["targets.json"])["targets"]]
    assert [t.name for t in targets] == ["app"]
    assert targets[0].password_env == "APP_DB_PASSWORD" and targets[0].sslrootcert is None
    (sts,) = chart["StatefulSet"]
    (init,) = sts["spec"]["template"]["spec"]["initContainers"]
    # Applied to the shared control store at each pod start (was: copied into each pod).
    assert init["args"][-4:] == ["targets", "apply", "--prune", "/etc/pgwarden/targets.json"]
    assert init["args"][:2] == ["--config", "/etc/pgwarden/pgwarden.toml"]
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert mounts["/etc/pgwarden"] == "config"
    assert {e["name"]: e for e in init["env"]} == {e["name"]: e for e in _control_env(chart)}


def _control_env(chart: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    names = {"PGWARDEN_STATE_DIR", "PGWARDEN_CONTROL__STORE", "PGWARDEN_CONTROL__POSTGRES_DSN"}
    return [e for e in _container(chart)["env"] if e["name"] in names]


def test_replicas_share_one_control_store(chart: dict[str, list[dict[str, Any]]]) -> None:
    """Targets, tokens and approvals in one PostgreSQL control store: a token issued in one
    pod is accepted by every replica, without an OIDC provider."""
    env = {e["name"]: e for e in _control_env(chart)}
    assert env["PGWARDEN_CONTROL__STORE"]["value"] == "postgres"
    ref = env["PGWARDEN_CONTROL__POSTGRES_DSN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "pgwarden-control", "key": "dsn"}
    (sts,) = chart["StatefulSet"]
    assert sts["spec"]["replicas"] > 1


def test_credentials_and_keys_come_from_secrets(chart: dict[str, list[dict[str, Any]]]) -> None:
    container = _container(chart)
    env = {e["name"]: e for e in container["env"]}
    state = Path(env["PGWARDEN_STATE_DIR"]["value"])
    # The target credentials: a Secret's keys as the env vars the targets name.
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["pgwarden-target-credentials"]
    # The shared PostgreSQL audit store, its DSN from a Secret; one chain per replica.
    assert env["PGWARDEN_AUDIT__STORE"]["value"] == "postgres"
    assert "secretKeyRef" in env["PGWARDEN_AUDIT__POSTGRES_DSN"]["valueFrom"]
    assert env["PGWARDEN_INSTANCE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (sts,) = chart["StatefulSet"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    by_path = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path in (state / SIGNING_KEY_FILE, state / "mask.key"):
        mount = by_path[str(path)]
        assert mount["subPath"] == path.name and mount.get("readOnly") is True
        assert "secret" in volumes[mount["name"]], path
    for key in ("TLS_CERT", "TLS_KEY"):
        for listener in ("LISTENER", "ADMIN"):
            path = Path(env[f"PGWARDEN_{listener}__{key}"]["value"])
            assert "secret" in volumes[by_path[str(path.parent)]["name"]]
    # Each replica's own state (audit chain keys) outlives its pod.
    claims = [c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]]
    assert by_path[str(state)]["name"] in claims
