"""One trace per request across the real mesh, received by a real OTLP endpoint: the span tree from the
gateway through tokenizer, router (and kv-index) to the worker, parent links, and the attributes."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict

import httpx
import pytest
from observability_checks import CLIENT, SERVER, complete_trace, one, trace_of

PROMPT = "Tell me everything you know about the history of the Roman empire and its many emperors, please."


def _chat(mesh, stream: bool, max_tokens: int) -> str:
    """One chat completion; returns its request id (the id the gateway answers with)."""
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    with httpx.Client(base_url=mesh.base_url, timeout=60) as client:
        if not stream:
            r = client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            return r.json()["id"]
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return json.loads(events[0])["id"]


@pytest.mark.parametrize("stream", [False, True])
def test_one_trace_per_request_with_the_whole_path(traced_mesh, otlp, stream):
    request_id = _chat(traced_mesh, stream, max_tokens=6)
    trace = trace_of(otlp.wait_for(complete_trace(request_id)), request_id)
    by_id = {s.span_id: s for s in trace}

    # one root (FastAPI's HTTP server span), every other span's parent is in the same trace
    roots = [s for s in trace if not s.parent_id]
    assert [(r.name, r.service, r.kind) for r in roots] == [
        ("POST /v1/chat/completions", "kvmesh-gateway", SERVER)
    ]
    assert roots[0].attributes["http.response.status_code"] == 200
    root = one(trace, "kvmesh.gateway.request", "kvmesh-gateway")
    assert root.parent_id == roots[0].span_id
    for s in trace:
        assert not s.parent_id or s.parent_id in by_id, f"{s.service}/{s.name} has a dangling parent"
        assert s.status != 2, f"{s.service}/{s.name} failed"
    assert {s.service for s in trace} >= {
        "kvmesh-gateway",
        "kvmesh-tokenizer",
        "kvmesh-router",
        "kvmesh-worker",
    }
    # the router answers from its own replica of the KV index (--index local): no lookup hop
    assert not [s for s in trace if s.name == "kvmesh.kv_index.overlap"]

    # gateway -> NATS client span -> the service's server span, for each hop of the request path
    hops = {}
    for subject, service in [
        ("kvmesh.tokenizer.encode", "kvmesh-tokenizer"),
        ("kvmesh.router.route", "kvmesh-router"),
        ("kvmesh.worker.*.generate", "kvmesh-worker"),
    ]:
        client = one(trace, subject, "kvmesh-gateway", CLIENT)
        server = one(trace, subject, service, SERVER)
        assert client.parent_id == root.span_id
        assert server.parent_id == client.span_id
        hops[service] = server

    # the attributes each hop adds
    prompt_tokens = root.attributes["gen_ai.usage.input_tokens"]
    assert prompt_tokens > 16
    assert root.attributes["gen_ai.usage.output_tokens"] == 6
    assert root.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert root.attributes["kvmesh.stream"] is stream
    assert 0 < root.attributes["kvmesh.ttft_s"] <= root.attributes["kvmesh.e2e_s"]
    assert hops["kvmesh-tokenizer"].attributes["gen_ai.usage.input_tokens"] == prompt_tokens
    assert hops["kvmesh-tokenizer"].attributes["kvmesh.tokenizer.num_blocks"] == prompt_tokens // 16
    route = hops["kvmesh-router"].attributes
    chosen = route["kvmesh.worker_id"]
    assert chosen in traced_mesh.worker_ids and root.attributes["kvmesh.worker_id"] == chosen
    assert sorted(route["kvmesh.router.candidates"]) == sorted(traced_mesh.worker_ids)
    assert len(route["kvmesh.router.scores"]) == 2 and route["kvmesh.router.reason"] in ("prefix", "load")

    # the worker's request span covers queue -> prefill -> decode, timed by the engine
    work = one(trace, "kvmesh.worker.request", "kvmesh-worker")
    assert work.parent_id == hops["kvmesh-worker"].span_id
    assert work.attributes["kvmesh.worker_id"] == chosen
    assert work.attributes["gen_ai.usage.input_tokens"] == prompt_tokens
    assert work.attributes["gen_ai.usage.output_tokens"] == 6
    assert work.attributes["kvmesh.cached_tokens"] == root.attributes["kvmesh.cached_tokens"]
    assert work.attributes["kvmesh.queue_time_s"] >= 0
    phases = [one(trace, f"kvmesh.worker.{p}", "kvmesh-worker") for p in ("queue", "prefill", "decode")]
    for phase in phases:
        assert phase.parent_id == work.span_id
        assert phase.start_ns <= phase.end_ns
    for before, after in itertools.pairwise(phases):
        assert before.end_ns == after.start_ns
    assert phases[-1].end_ns == work.end_ns
    assert root.start_ns <= work.start_ns <= work.end_ns <= root.end_ns


def test_no_span_per_token_and_no_traces_outside_requests(traced_mesh, otlp):
    short, long = _chat(traced_mesh, True, max_tokens=2), _chat(traced_mesh, True, max_tokens=40)
    spans = otlp.wait_for(lambda s: complete_trace(short)(s) and complete_trace(long)(s))
    counts = [defaultdict(int) for _ in range(2)]
    for count, rid in zip(counts, (short, long), strict=True):
        for s in trace_of(spans, rid):
            count[(s.service, s.name)] += 1
    assert counts[0] == counts[1]  # 20x the tokens, the same spans
    # probes (/health, /ready), scrapes, heartbeats and KV events make no traces: every trace is a
    # client's request (the tests of this mesh also call /tokenize)
    roots = [s for s in otlp.snapshot() if not s.parent_id]
    requests = {"POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize"}
    assert roots and {s.name for s in roots} <= requests, {s.name for s in roots}
