"""The deployment files, checked offline: compose against the compose spec, the Kubernetes
manifests strictly against the API's schemas, every metric the dashboard plots and the autoscaler
reads is one the services export, and every command they run parses with our CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from easyphoto.cli.main import build_parser
from easyphoto.rpc.metrics import GrpcMetrics
from easyphoto.server.metrics import GeneratorMetrics
from easyphoto.trainer.metrics import TrainerMetrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KUBERNETES_VERSION = "1.30.0"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _manifests() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]


def _kind(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in _manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


def _exported_series() -> set[str]:
    """Every series name the orchestrator and the trainer can export."""
    registry = CollectorRegistry()
    GrpcMetrics(registry), GeneratorMetrics(registry), TrainerMetrics(registry)
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


def test_the_compose_file_follows_the_compose_spec() -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(DEPLOY / "compose.yaml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_kubernetes_manifests_validate_strictly() -> None:
    manifests = _manifests()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in manifests}
    for wanted in ("triton", "orchestrator", "trainer"):
        assert ("Deployment", wanted) in kinds and ("Service", wanted) in kinds
    assert ("HorizontalPodAutoscaler", "orchestrator") in kinds
    for doc in manifests:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error


def test_every_namespace_the_manifests_use_they_create() -> None:
    """So that the README's one `kubectl apply` works on a fresh cluster."""
    manifests = _manifests()
    created = {d["metadata"]["name"] for d in manifests if d["kind"] == "Namespace"}
    used = {d["metadata"]["namespace"] for d in manifests if d["kind"] != "Namespace"}
    assert used <= created, used - created


def test_the_validator_rejects_a_misspelt_field() -> None:
    deployment = _kind("Deployment", "trainer")
    deployment["spec"]["template"]["spec"]["containers"][0]["portz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def plotted_series(prefixes: tuple[str, ...]) -> set[str]:
    """The series the Grafana dashboard plots whose names start with one of ``prefixes``."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "easyphoto.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    # Label matchers and grouping name labels, not series: leave them out first.
    bare = [re.sub(r"\{[^}]*\}|\bby \([^)]*\)", "", expr) for expr in exprs]
    pattern = rf"\b((?:{'|'.join(prefixes)})_[a-z0-9_]+)\b"
    return {name for expr in bare for name in re.findall(pattern, expr)}


def test_every_metric_the_dashboard_plots_is_one_the_services_export() -> None:
    """Ours; Triton's (nv_*) are checked against a running tritonserver in test_triton."""
    plotted = plotted_series(("easyphoto", "grpc"))
    assert len(plotted) >= 10
    assert plotted <= _exported_series(), plotted - _exported_series()


def test_the_autoscaler_reads_a_gauge_the_adapter_publishes_and_the_orchestrator_exports() -> None:
    hpa = _kind("HorizontalPodAutoscaler", "orchestrator")
    (metric,) = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    rules = yaml.safe_load(_kind("ConfigMap", "easyphoto-adapter-rules")["data"]["config.yaml"])["rules"]
    assert metric in {rule["name"]["as"] for rule in rules}
    assert metric in _exported_series() and hpa["spec"]["scaleTargetRef"]["name"] == "orchestrator"


def _container(name: str) -> dict[str, Any]:
    return _kind("Deployment", name)["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", ["orchestrator", "trainer"])
def test_what_the_deployments_run_parses_and_their_probes_ask_our_health_services(name: str) -> None:
    container = _container(name)
    args = [arg.replace("$(POD_NAME)", "trainer-0") for arg in container["args"]]
    parsed = build_parser().parse_args(args)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert (parsed.port, parsed.metrics_port) == (ports["grpc"], ports["metrics"])
    annotations = _kind("Deployment", name)["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == parsed.metrics_port
    # gRPC is TLS-only with API keys: the probes are the plaintext HTTP ones of the metrics port.
    assert parsed.tenants and parsed.tls_cert and parsed.tls_key
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    for path in (parsed.tenants, parsed.tls_cert, parsed.tls_key):
        assert any(path.startswith(f"{folder}/") for folder in mounted), path
    assert _kind("Service", name)["spec"]["clusterIP"] == "None"  # headless: clients balance


def test_what_compose_runs_parses_and_prometheus_scrapes_its_metrics_ports() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        target for job in scrape["scrape_configs"] for c in job["static_configs"] for target in c["targets"]
    }
    for service in ("orchestrator", "trainer"):
        parsed = build_parser().parse_args(compose["services"][service]["command"])
        assert f"{service}:{parsed.metrics_port}" in targets
        assert parsed.metrics_host == "0.0.0.0" and parsed.host == "0.0.0.0"
        secrets = {f"/run/secrets/{name}" for name in compose["services"][service]["secrets"]}
        assert {parsed.tenants, parsed.tls_cert, parsed.tls_key} <= secrets
    trainer = compose["services"]["trainer"]
    parsed = build_parser().parse_args(trainer["command"])
    assert parsed.orchestrator_tls_ca in {f"/run/secrets/{name}" for name in trainer["secrets"]}
    assert "EASYPHOTO_ORCHESTRATOR_API_KEY" in trainer["environment"]  # the service key
