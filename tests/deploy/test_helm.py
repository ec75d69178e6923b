"""The Helm chart (infra/k8s/kvmesh) rendered offline by Helm's own Go engine (PyPI helm-python-sdk:
Helm v4's SDK behind a C ABI, no cluster, no helm binary), linted by `helm lint`'s rules, and every
rendered manifest checked against the Kubernetes API's strict JSON schemas (PyPI
kubernetes-validate, the kubeconform-style check: unknown fields fail)."""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

CHART = ROOT / "infra" / "k8s" / "kvmesh"
KUBE_VERSION = "1.31.0"  # the oldest Kubernetes the chart's manifests are checked against
COMPONENTS = {"gateway", "tokenizer", "router", "kv-index", "prefill-worker", "decode-worker"}
# Everything switched on: external NATS/Redis, tracing, a model cache claim, a ServiceMonitor,
# the optional workers and a second HPA.
EVERYTHING = {
    "nats": {"enabled": False},
    "redis": {"enabled": False},
    "externalNats": {"url": "nats://nats.messaging:4222"},
    "externalRedis": {"url": "redis://redis.cache:6379"},
    "otel": {"endpoint": "http://otel-collector.observability:4318"},
    "modelCache": {"existingClaim": "kvmesh-models"},
    "metrics": {"serviceMonitor": {"enabled": True}},
    "components": {
        "worker": {"enabled": True},
        "simWorker": {"enabled": True},
        "gateway": {"autoscaling": {"enabled": True}},
    },
    "config": {"KVMESH_BLOCK_SIZE": "32"},
}


def render(values: dict | None = None) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name="demo", namespace="llm", is_install=True)
    docs = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"].removeprefix("demo-kvmesh-"): d for d in docs if d["kind"] == kind}


# Every supported way to get NATS and Redis: the chart's own servers, or servers you run.
EXTERNAL_NATS = {"nats": {"enabled": False}, "externalNats": {"url": "nats://nats.messaging:4222"}}
EXTERNAL_REDIS = {"redis": {"enabled": False}, "externalRedis": {"url": "redis://redis.cache:6379"}}
CONFIGURATIONS = {
    "bundled": {},
    "external-nats": EXTERNAL_NATS,
    "external-redis": EXTERNAL_REDIS,
    "bundled-nats-without-volume": {"nats": {"persistence": {"enabled": False}}},
    "everything-external": EVERYTHING,
}


@pytest.fixture(scope="module")
def default_docs() -> list[dict]:
    return render()


@pytest.fixture(scope="module")
def everything_docs() -> list[dict]:
    return render(EVERYTHING)


@pytest.mark.parametrize("values", CONFIGURATIONS.values(), ids=CONFIGURATIONS.keys())
def test_helm_lint_is_clean(values):
    """`helm lint --strict`: no error and no warning in any supported configuration (the one finding
    left is the informational "icon is recommended")."""
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    assert [m["error"] for m in report["messages"]] == ["icon is recommended"]


@pytest.mark.parametrize("values", CONFIGURATIONS.values(), ids=CONFIGURATIONS.keys())
def test_every_manifest_is_valid_kubernetes(values):
    checked = 0
    for doc in render(values):
        if doc["kind"] == "ServiceMonitor":  # a CRD: not in the core API schemas
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        checked += 1
    assert checked >= 15


def test_the_schema_check_is_strict():
    """The check above can fail: a misspelled field or a wrong type is rejected."""
    deployment = next(d for d in render() if d["kind"] == "Deployment")
    deployment["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)
    del deployment["spec"]["replica"]
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_one_deployment_and_service_per_component(default_docs, everything_docs):
    assert set(by_kind(default_docs, "Deployment")) == COMPONENTS | {"redis"}
    assert set(by_kind(default_docs, "Service")) == COMPONENTS | {"nats", "redis"}
    assert set(by_kind(everything_docs, "Deployment")) == COMPONENTS | {"worker", "sim-worker"}
    commands = {
        name: d["spec"]["template"]["spec"]["containers"][0]["command"][-1]
        + " "
        + " ".join(d["spec"]["template"]["spec"]["containers"][0].get("args", []))
        for name, d in by_kind(everything_docs, "Deployment").items()
    }
    assert commands["prefill-worker"] == "kvmesh.services.worker --role prefill"
    assert commands["decode-worker"] == "kvmesh.services.worker --role decode"
    assert commands["worker"] == "kvmesh.services.worker --role aggregated"
    assert commands["kv-index"] == "kvmesh.services.kv_index "
    assert commands["gateway"].startswith("kvmesh.services.gateway --host 0.0.0.0 --port 8000")


def test_pods_have_probes_resources_config_and_tracing(everything_docs):
    config = by_kind(everything_docs, "ConfigMap")["config"]["data"]
    assert config["KVMESH_NATS_URL"] == "nats://nats.messaging:4222"
    assert config["KVMESH_REDIS_URL"] == "redis://redis.cache:6379"
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    assert config["KVMESH_METRICS_PORT"] == "9400" and config["KVMESH_BLOCK_SIZE"] == "32"
    for name, deployment in by_kind(everything_docs, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        port = 8000 if name == "gateway" else 9400
        ready = "/ready" if name == "gateway" else "/health"  # the gateway: ready = a worker can serve
        assert container["readinessProbe"]["httpGet"] == {"path": ready, "port": port}, name
        assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": port}, name
        assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": port}, name
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["OTEL_SERVICE_NAME"] == f"kvmesh-{name}", name
        assert int(env["KVMESH_THREADS"]) >= 1, name
        if "worker" in name and name != "sim-worker":
            assert env["UCX_NET_DEVICES"] == "all", f"{name}: NIXL must reach other pods"
        assert container["envFrom"] == [{"configMapRef": {"name": "demo-kvmesh-config"}}], name
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port), name
        assert pod["initContainers"][0]["name"] == "model-init", name
        assert pod["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": "kvmesh-models"}}]
    assert by_kind(everything_docs, "ServiceMonitor")


def test_bundled_nats_and_redis_are_the_charts_own(default_docs):
    """No subcharts (nothing to download); the ConfigMap's URLs name the bundled servers' Services."""
    assert "dependencies" not in yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert not (CHART / "charts").exists()
    config = by_kind(default_docs, "ConfigMap")["config"]["data"]
    assert config["KVMESH_NATS_URL"] == "nats://demo-kvmesh-nats:4222"
    assert config["KVMESH_REDIS_URL"] == "redis://demo-kvmesh-redis:6379"
    assert config["OTEL_SDK_DISABLED"] == "true", "no endpoint: tracing off, no export errors"
    services = by_kind(default_docs, "Service")
    for name, port in (("nats", 4222), ("redis", 6379)):
        assert port in [p["port"] for p in services[name]["spec"]["ports"]], name
    nats = by_kind(default_docs, "StatefulSet")["nats"]
    assert nats["spec"]["selector"]["matchLabels"] == services["nats"]["spec"]["selector"]
    (container,) = nats["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["--jetstream", "--store_dir", "/data"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz?js-enabled-only=true"
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    redis = by_kind(default_docs, "Deployment")["redis"]
    assert redis["spec"]["selector"]["matchLabels"] == services["redis"]["spec"]["selector"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["command"][:5] == ["redis-server", "--save", "", "--appendonly", "no"]


def test_external_nats_and_redis_replace_the_bundled_ones(everything_docs):
    assert "nats" not in by_kind(everything_docs, "StatefulSet")
    assert not {"nats", "redis"} & set(by_kind(everything_docs, "Service"))
    assert "redis" not in by_kind(everything_docs, "Deployment")


def test_decode_workers_autoscale_on_queue_depth_and_kv_usage(default_docs):
    hpas = by_kind(default_docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"decode-worker"}
    spec = hpas["decode-worker"]["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "demo-kvmesh-decode-worker",
    }
    metrics = {m["pods"]["metric"]["name"] for m in spec["metrics"] if m["type"] == "Pods"}
    assert metrics == {"kvmesh_num_requests_waiting", "kvmesh_kv_cache_usage_perc"}
    assert "replicas" not in by_kind(default_docs, "Deployment")["decode-worker"]["spec"], "the HPA owns it"
    # prometheus-adapter serves exactly these names, from the contract's vLLM metrics.
    adapter = yaml.safe_load((ROOT / "infra/k8s/prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"]: rule["seriesQuery"].split("{")[0] for rule in adapter["rules"]["custom"]}
    assert served == {
        "kvmesh_num_requests_waiting": "vllm:num_requests_waiting",
        "kvmesh_kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
    }


def test_the_dashboard_configmap_is_the_grafana_dashboard(default_docs):
    configmap = by_kind(default_docs, "ConfigMap")["dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((ROOT / "infra/grafana/dashboards/kvmesh.json").read_text())
    assert json.loads(configmap["data"]["kvmesh.json"]) == shipped


@pytest.mark.parametrize(
    "values",
    [
        {"components": {"decodeWorker": {"replica": 3}}},  # misspelled key
        {"otel": {"endpont": "http://x:4318"}},
        {"components": {"gateway": {"threads": 0}}},
        {"nats": {"enabled": False}},  # no externalNats.url: the chart cannot know where NATS is
        {"redis": {"enabled": False}},
        {"nats": {"persistence": {"size": "10 gigabytes"}}},
        {"redis": {"image": {"tag": ""}}},
    ],
)
def test_bad_values_are_rejected(values):
    with pytest.raises(helm.HelmError):
        render(values)


def test_the_chart_archive_is_self_contained(tmp_path):
    """The dashboard is a symlink into infra/grafana: the chart archive carries its content."""
    with helm.Chart.load(CHART) as chart:
        archive = Path(chart.save(tmp_path))
    with helm.Chart.load(archive) as chart:
        assert any(f["name"] == "dashboards/kvmesh.json" for f in chart.files)
