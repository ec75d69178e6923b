"""/metrics of the real mesh's processes, parsed with prometheus_client's own text parser: the shared
metric names are there with their labels, and after a few requests the counts moved by exactly what
the requests did (histogram counts = requests, token sums = the usage the clients got back). Every
series read must exist (`measured`): a series that is gone fails, it does not read as 0."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from observability_checks import has, label_values, measured, scrape, total

MAX_TOKENS = 5
BLOCK = 16  # the workers' KV block size: prefix hits come in whole blocks
# A prompt prefix worth several blocks, then tails that differ from their first character on
PREFIX = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep. " * 5
FOLLOW_UPS = 8  # bounded: how many prompts repeating PREFIX may be sent before the router must see it


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
        return measured(g1, name, **model, **labels) - total(g0, name, **model, **labels)

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
            measured(g1, "kvmesh:nats_request_seconds_count", subject=subject)
            - total(g0, "kvmesh:nats_request_seconds_count", subject=subject)
            == n
        ), subject


def test_worker_metrics_count_the_requests(traffic, traced_mesh):
    before, after, usages = traffic
    workers = traced_mesh.worker_ids
    n = len(usages)

    def delta(name: str, **labels: str) -> float:
        # a labelled series appears once a worker has used it: in at least one worker after the requests
        assert any(has(after[w], name, **labels) for w in workers), f"no worker reports {name}{labels}"
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
        assert measured(samples, "vllm:num_requests_running", worker_id=w) == 0  # all finished
        assert measured(samples, "vllm:num_requests_waiting", worker_id=w) == 0
        # the finished requests' blocks stay cached (findable, evictable): usage counts only blocks in use
        assert 0 <= measured(samples, "vllm:kv_cache_usage_perc", worker_id=w) <= 1
        assert measured(samples, "vllm:num_preemptions_total", worker_id=w) == 0  # 512 blocks: no pressure


HIT = "kvmesh:router_prefix_hit_tokens_total"
AVAILABLE = "kvmesh:router_prefix_available_tokens_total"


def test_router_metrics_count_the_decisions(traffic):
    before, after, usages = traffic
    r0, r1 = before["router"], after["router"]
    n = len(usages)
    decisions = measured(r1, "kvmesh:router_decisions_total") - total(r0, "kvmesh:router_decisions_total")
    assert decisions == n
    assert label_values(r1, "kvmesh:router_decisions_total", "reason") <= {
        "prefix",
        "session",
        "load",
        "only",
    }
    hit = measured(r1, HIT) - total(r0, HIT)
    available = measured(r1, AVAILABLE) - total(r0, AVAILABLE)
    assert hit == available  # whatever was cached somewhere, the router went there (a hit > 0: below)
    count = "kvmesh:router_decision_seconds_count"
    assert measured(r1, count) - total(r0, count) == n
    # with two workers every decision looked up the prefix overlap, in the router's own replica of
    # the index (--index local, the default): none asked the kv-index over NATS
    overlap = "kvmesh:nats_request_seconds_count"
    asked = total(r1, overlap, subject="kvmesh.kv_index.overlap") - total(
        r0, overlap, subject="kvmesh.kv_index.overlap"
    )
    assert asked == 0


def _tokens(client: httpx.Client, prompt: str) -> list[int]:
    r = client.post("/tokenize", json={"prompt": prompt})
    r.raise_for_status()
    return r.json()["tokens"]


def _shared_blocks(a: list[int], b: list[int]) -> int:
    """Leading full blocks two token sequences have in common (the blocks whose chained hashes match)."""
    n = 0
    while (n + 1) * BLOCK <= min(len(a), len(b)) and a[n * BLOCK : (n + 1) * BLOCK] == b[
        n * BLOCK : (n + 1) * BLOCK
    ]:
        n += 1
    return n


async def fresh_heartbeats(nats_url: str, worker_ids: list[str], beats: int = 2) -> None:
    """Until each worker has sent `beats` heartbeats from now on, the last one with nothing running
    (the router hears the same messages; two beats leave it time to have applied the first)."""
    from kvmesh.libs.bus import Bus, decode
    from kvmesh.schemas.messages import Heartbeat, Subjects

    bus = await Bus.connect(nats_url, "test-heartbeats")
    heard = dict.fromkeys(worker_ids, 0)
    try:
        _sub, queue = await bus.subscribe_queue(Subjects.WORKER_HEARTBEAT)
        async with asyncio.timeout(30):  # a hang guard: beats come every 0.5 s
            while min(heard.values()) < beats:
                stats = decode((await queue.get()).data, Heartbeat).stats
                if stats.worker_id in heard:
                    heard[stats.worker_id] = heard[stats.worker_id] + 1 if stats.num_running == 0 else 0
    finally:
        await bus.close()


def test_a_repeated_prefix_is_a_router_prefix_hit(traced_mesh):
    """A prompt that repeats an earlier one's first blocks: the router finds them cached on a worker,
    sends the request there, and its hit-token counter moves by exactly those blocks' tokens, which
    the worker then serves from its prefix cache."""
    router = traced_mesh.metrics_urls["router"]
    with httpx.Client(base_url=traced_mesh.base_url, timeout=60) as client:
        first = PREFIX + "Question: how many sheep does the farmer have?"
        sent = [_tokens(client, first)]
        client.post("/v1/completions", json={"prompt": first, "max_tokens": 2}).raise_for_status()
        # Until a heartbeat from after that request has reached the router, it still counts the
        # request's tokens as load on the worker holding the prefix (more than the prefix saves), and
        # a follow-up rightly goes to the idle worker instead.
        asyncio.run(fresh_heartbeats(traced_mesh.nats_url, traced_mesh.worker_ids))
        # The router learns of the first prompt's blocks from the KV event stream, a moment after the
        # request ended: follow-ups (each with a tail of its own) until one finds them, a bounded number
        for i in range(FOLLOW_UPS):
            prompt = PREFIX + f"{'ABCDEFGH'[i]}nother question, number {i}: what colour is the fox?"
            tokens = _tokens(client, prompt)
            expected = BLOCK * max(_shared_blocks(tokens, t) for t in sent)
            r0 = scrape(router)
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
            r.raise_for_status()
            r1 = scrape(router)
            sent.append(tokens)
            available = measured(r1, AVAILABLE) - total(r0, AVAILABLE)
            if available:
                break
        else:
            raise AssertionError(f"{FOLLOW_UPS} prompts repeating a cached prefix: the router never saw it")
    hit = measured(r1, HIT) - total(r0, HIT)
    assert expected >= 4 * BLOCK, expected  # the shared prefix spans blocks
    assert hit == available == expected, (hit, available, expected)
    assert (
        measured(r1, "kvmesh:router_decisions_total", reason="prefix")
        - total(r0, "kvmesh:router_decisions_total", reason="prefix")
        == 1
    )
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == expected
