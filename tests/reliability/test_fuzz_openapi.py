"""Schemathesis against the gateway's own OpenAPI schema, on a real running gateway in front of the real
mesh: every operation, valid and invalid bodies, never a 5xx, never a hang, and every answer is what
the schema says: a documented status, a documented content type, a body that conforms to the response
model of that status (services/gateway/openapi.py), each event of a stream too. The gateway here is a
second one on the same NATS, with an API key (sent by the fuzzer), small limits so that accepted
requests stay cheap, and DEBUG logs that are then searched for the key."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kvmesh.libs.launcher import free_port

API_KEY = "sk-fuzz-5b1e0c7a9d"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT_S = 60  # per call: a hang fails the test
EXAMPLES = 120  # per operation (hypothesis stops sooner for one without inputs, e.g. GET /v1/models)
DEADLINE_S = 180  # per operation, a hard bound (pytest-timeout)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
GENERATION_ROUTES = ("POST /v1/chat/completions", "POST /v1/completions")
SENT: collections.Counter[str] = collections.Counter()  # requests sent, by operation


@pytest.fixture(scope="module")
def fuzz_gateway(mesh, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("fuzz-gateway") / "gateway.log"
    env = {
        **os.environ,
        "KVMESH_NATS_URL": mesh.nats_url,
        "KVMESH_MODEL": mesh.config.model,
        "KVMESH_API_KEYS": API_KEY,
        "KVMESH_LOG_LEVEL": "DEBUG",
        "KVMESH_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    argv = [sys.executable, "-m", "kvmesh.services.gateway", "--port", str(port)]
    argv += ["--max-tokens-cap", "4", "--max-prompt-tokens", "256", "--max-body-bytes", "65536"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the fuzzed gateway did not come up"
                time.sleep(0.1)
        yield base, log
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def api_schema(fuzz_gateway):
    base, _ = fuzz_gateway
    raw = json.loads(urllib.request.urlopen(_authorized(f"{base}/openapi.json"), timeout=10).read())
    # A random model name is a 404 before anything runs: the positive examples name the served model
    # (or none), so that they reach the workers and their answers, streams included, get checked.
    model = json.loads(urllib.request.urlopen(_authorized(f"{base}/v1/models"), timeout=10).read())
    served = model["data"][0]["id"]
    for component in raw["components"]["schemas"].values():
        if "model" in component.get("properties", {}):
            component["properties"]["model"] = {"anyOf": [{"enum": [served]}, {"type": "null"}]}
    return schemathesis.openapi.from_dict(raw)


def _authorized(url: str) -> urllib.request.Request:
    return urllib.request.Request(url, headers=HEADERS)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples every run
)
@pytest.mark.timeout(DEADLINE_S)
def test_every_answer_is_as_documented(case, fuzz_gateway):
    base, _ = fuzz_gateway
    SENT[f"{case.method.upper()} {case.path}"] += 1
    case.call_and_validate(base_url=base, headers=HEADERS, checks=CHECKS, timeout=TIMEOUT_S)


def test_the_generation_routes_were_fuzzed_in_earnest():
    """After the fuzzing above: each main route got its examples (not a handful)."""
    for route in GENERATION_ROUTES:
        assert SENT[route] >= 100, dict(SENT)


def test_the_key_never_reached_the_logs(fuzz_gateway):
    """After the fuzzing (hundreds of authorized requests, DEBUG logging) and a few refused ones."""
    base, log = fuzz_gateway
    for auth in (f"Bearer {API_KEY}x", API_KEY):
        req = urllib.request.Request(f"{base}/v1/models", headers={"Authorization": auth})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 401
    text = log.read_text()
    assert "DEBUG" in text or "INFO" in text, "the log is being written"
    assert API_KEY not in text
