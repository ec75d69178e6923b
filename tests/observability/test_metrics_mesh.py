"""/metrics of the real mesh's processes, parsed with prometheus_client's own text parser: the shared
metric names are there with their labels, and after a few requests the counts moved by exactly what
the requests did (histogram counts = requests, token sums = the usage the clients got back)."""

from __future__ import annotations

import json

import httpx
import pytest
from observability_checks import label_values, scrape, total

MAX_TOKENS = 5


def _request(client: httpx.Client, i: int, stream: bool) -> dict:
    """One completion; returns its usage."""
    body = {
        "prompt": f"Request number {i}: " + "count the sheep in the field one by one. " * 4,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": stream,
    }
    if not stream:
        r = client.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]
    body["stream_options"] = {"include_usage": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return events[-1]["usage"]


@pytest.fixture(scope="module")
def traffic(traced_mesh):
    """Scrapes of every process before and after 3 requests (2 whole, 1 streamed), and their usage."""
    urls = traced_mesh.metrics_urls
    before = {name: scrape(url) for name, url in urls.items()}
    with httpx.Client(base_url=traced_mesh.base_url, timeout=60) as client:
        usages = [_request(client, i, stream) for i, stream in enumerate([False, True, False])]
    after = {name: scrape(url) for name, url in urls.items()}
    return before, after, usages


def test_every_process_serves_metrics_and_health(traced_mesh):
    assert set(traced_mesh.metrics_urls) >= {
        "gateway",
        "tokenizer",
        "router",
        "kv-index",
        *traced_mesh.worker_ids,
    }
    for name, url in traced_mesh.metrics_urls.items():
        samples = scrape(url)
        assert ("process_cpu_seconds_total", ()) in samples, name
        health = url.removesuffix("/metrics") + "/health"
        assert httpx.get(health, timeout=10).status_code == 200, name


def test_gateway_metrics_count_the_requests(traffic):
    before, after, usages = traffic
    g0, g1 = before["gateway"], after["gateway"]
    n = len(usages)
    model = {"model_name": "tiny-chat"}

    def delta(name: str, **labels: str) -> float:
        return total(g1, name, **model, **labels) - total(g0, name, **model, **labels)

    for histogram in (
        "vllm:e2e_request_latency_seconds",
        "vllm:time_to_first_token_seconds",
        "vllm:time_per_output_token_seconds",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
    ):
        assert delta(f"{histogram}_count") == n, histogram
        # the +Inf bucket holds every observation
        assert delta(f"{histogram}_bucket", le="+Inf") == n, histogram
    # one inter-token gap per token after the first (one chunk per engine step)
    assert delta("vllm:inter_token_latency_seconds_count") == n * (MAX_TOKENS - 1)
    assert delta("vllm:request_prompt_tokens_sum") == sum(u["prompt_tokens"] for u in usages)
    assert delta("vllm:request_generation_tokens_sum") == n * MAX_TOKENS
    assert delta("vllm:request_success_total", finished_reason="length") == n
    assert delta("kvmesh:gateway_requests_total", status="200") == n
    assert delta("vllm:time_to_first_token_seconds_sum") < delta("vllm:e2e_request_latency_seconds_sum")
    # the gateway's NATS requests, by subject with the worker id folded away
    for subject in ("kvmesh.tokenizer.encode", "kvmesh.router.route", "kvmesh.worker.*.generate"):
        assert (
            total(g1, "kvmesh:nats_request_seconds_count", subject=subject)
            - total(g0, "kvmesh:nats_request_seconds_count", subject=subject)
            == n
        ), subject


def test_worker_metrics_count_the_requests(traffic, traced_mesh):
    before, after, usages = traffic
    workers = traced_mesh.worker_ids
    n = len(usages)

    def delta(name: str, **labels: str) -> float:
        return sum(total(after[w], name, **labels) - total(before[w], name, **labels) for w in workers)

    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    assert delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("vllm:generation_tokens_total") == n * MAX_TOKENS
    assert delta("vllm:prefix_cache_queries_total") == prompt_tokens
    assert delta("vllm:prefix_cache_hits_total") == sum(
        u["prompt_tokens_details"]["cached_tokens"] for u in usages
    )
    assert delta("kvmesh:prefill_requests_total", where="local") == n
    for histogram in (
        "vllm:request_queue_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
    ):
        assert delta(f"{histogram}_count") == n, histogram
    for w in workers:
        samples = after[w]
        assert label_values(samples, "vllm:num_requests_running", "worker_id") == {w}
        assert label_values(samples, "vllm:generation_tokens_total", "model_name") <= {"tiny-chat"}
        assert total(samples, "vllm:num_requests_running") == 0  # all finished
        assert total(samples, "vllm:num_requests_waiting") == 0
        assert 0 <= total(samples, "vllm:kv_cache_usage_perc") <= 1
        assert total(samples, "vllm:num_preemptions_total") >= 0


def test_router_metrics_count_the_decisions(traffic):
    before, after, usages = traffic
    r0, r1 = before["router"], after["router"]
    n = len(usages)
    decisions = total(r1, "kvmesh:router_decisions_total") - total(r0, "kvmesh:router_decisions_total")
    assert decisions == n
    assert label_values(r1, "kvmesh:router_decisions_total", "reason") <= {
        "prefix",
        "session",
        "load",
        "only",
    }
    hit = total(r1, "kvmesh:router_prefix_hit_tokens_total") - total(
        r0, "kvmesh:router_prefix_hit_tokens_total"
    )
    available = total(r1, "kvmesh:router_prefix_available_tokens_total") - total(
        r0, "kvmesh:router_prefix_available_tokens_total"
    )
    assert 0 <= hit <= available
    count = "kvmesh:router_decision_seconds_count"
    assert total(r1, count) - total(r0, count) == n
    # with two workers every decision looked up the prefix overlap, in the router's own replica of
    # the index (--index local, the default): none asked the kv-index over NATS
    overlap = "kvmesh:nats_request_seconds_count"
    asked = total(r1, overlap, subject="kvmesh.kv_index.overlap") - total(
        r0, overlap, subject="kvmesh.kv_index.overlap"
    )
    assert asked == 0
