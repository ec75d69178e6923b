"""The health checks of docker-compose.yml and the chart's probes, run against a real kvmesh service
(the router, on a real nats-server) configured the way the containers configure it: the exact
compose health-check command must pass once the service is up, and fail when nothing answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from kvmesh.libs.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]


def compose_healthcheck(service: str, port: int) -> list[str]:
    """The service's compose health-check command (anchors resolved by YAML), aimed at `port`."""
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    test = doc["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return [arg.replace("127.0.0.1:9400", f"127.0.0.1:{port}") for arg in test[1:]]


def run_check(argv: list[str]) -> int:
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode


@pytest.fixture
def router(nats_url):
    port = free_port()
    env = {
        **os.environ,
        # the container environment (docker-compose.yml), but this machine's NATS and a free port
        "KVMESH_NATS_URL": nats_url,
        "KVMESH_METRICS_PORT": str(port),
        "OTEL_SERVICE_NAME": "kvmesh-router",
        "OMP_WAIT_POLICY": "PASSIVE",
        "KVMESH_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmesh.services.router"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    yield proc, port
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_compose_health_check_passes_on_a_running_service(router):
    proc, port = router
    check = compose_healthcheck("router", port)
    deadline = time.monotonic() + 60
    while run_check(check) != 0:  # compose retries the same way until start_period runs out
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the router never became healthy"
        time.sleep(0.5)
    # The chart's liveness probe: GET /metrics, with the router's own metrics in it.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert "kvmesh:router_decisions_total" in response.read().decode()


def test_compose_health_check_fails_when_nothing_answers():
    assert run_check(compose_healthcheck("router", free_port())) != 0
    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["gateway"]["healthcheck"][
        "test"
    ][1:]
    assert "http://127.0.0.1:8000/ready" in command[-1]  # healthy = a worker can serve, not just up
    assert run_check([arg.replace(":8000", f":{free_port()}") for arg in command]) != 0
