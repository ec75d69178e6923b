"""The load generator against a real HTTP server: a FastAPI app on uvicorn that streams OpenAI SSE chunks."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvmesh.loadtest.openai_load import (
    LengthDist,
    LoadConfig,
    RequestRecord,
    build_requests,
    run_load,
    summarize,
    write_results,
)


@dataclass
class FakeOpenAI:
    """Streams `max_tokens` tokens: first text after `ttft` s, then one chunk every `itl` s."""

    ttft: float = 0.05
    itl: float = 0.02
    tokens_per_chunk: int = 1
    include_usage: bool = True
    statuses: list[int] = field(default_factory=lambda: [200])  # cycled over incoming requests
    bodies: list[dict] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    tokens_sent: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    async def complete(self, request: Request):
        body = await request.json()
        status = self.statuses[len(self.bodies) % len(self.statuses)]
        self.bodies.append(body)
        self.auth.append(request.headers.get("authorization"))
        if status != 200:
            return JSONResponse({"error": {"message": f"fake failure {status}"}}, status_code=status)
        chat = request.url.path.endswith("chat/completions")
        return StreamingResponse(self.stream(body, chat), media_type="text/event-stream")

    async def stream(self, body: dict, chat: bool):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            n = body["max_tokens"]

            def chunk(text: str, finish: str | None = None) -> str:
                choice = {"index": 0, "finish_reason": finish}
                choice |= {"delta": {"content": text}} if chat else {"text": text}
                return f"data: {json.dumps({'choices': [choice], 'usage': None})}\n\n"

            if chat:  # like vLLM: a role-only first chunk with no text, at once; it must not count as TTFT
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
            await asyncio.sleep(self.ttft)
            sent = 0
            while sent < n:
                if sent:
                    await asyncio.sleep(self.itl)
                k = min(self.tokens_per_chunk, n - sent)
                yield chunk("tok " * k)
                sent += k
            self.tokens_sent += n
            yield chunk("", finish="length")
            if self.include_usage and body.get("stream_options", {}).get("include_usage"):
                usage = {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


@pytest.fixture(scope="module")
def server():
    """One uvicorn server in a thread, on a port the OS picked; each test installs a fresh FakeOpenAI."""
    current: dict[str, FakeOpenAI] = {}
    app = FastAPI()

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def complete(request: Request):
        return await current["fake"].complete(request)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    yield current, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    uv.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def fake(server) -> tuple[FakeOpenAI, str]:
    current, url = server
    current["fake"] = FakeOpenAI()
    return current["fake"], url


def config(url: str, **overrides) -> LoadConfig:
    defaults = dict(
        base_url=url,
        model="fake",
        num_requests=8,
        warmup=0,
        prompt_tokens=LengthDist(32),
        output_tokens=LengthDist(6),
        progress=False,
    )
    return LoadConfig(**(defaults | overrides))


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_closed_loop_counts_latencies_and_concurrency(fake, endpoint):
    srv, url = fake
    result = await run_load(config(url, endpoint=endpoint, concurrency=4, num_requests=16, warmup=2))
    s = result.summary
    assert (s["requests"], s["completed"], s["errors"]) == (16, 16, 0)
    assert len(srv.bodies) == 18, "two warm-up requests, then the 16 measured"
    assert s["output_tokens"] == 16 * 6 == srv.tokens_sent - 2 * 6
    assert all(r.output_tokens == 6 and len(r.itl) == 5 for r in result.records)
    assert s["mean_server_prompt_tokens"] == 10
    # generous bounds around the server's 50 ms TTFT and 20 ms ITL: no tight timing asserts
    assert 45 <= s["ttft_ms"]["p50"] < 400
    assert 15 <= s["itl_ms"]["p50"] < 200
    assert 15 <= s["tpot_ms"]["mean"] < 200
    assert s["e2e_ms"]["p50"] >= 45 + 5 * 15
    assert srv.max_in_flight <= 4 and s["max_in_flight"] <= 4
    assert s["max_in_flight"] >= 2, "four clients should overlap"
    assert s["output_tok_s"] > 0 and s["request_throughput"] > 0
    body = srv.bodies[-1]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0 and body["max_tokens"] == 6
    assert ("messages" in body) == (endpoint == "chat") and ("prompt" in body) == (endpoint == "completions")


async def test_multi_token_chunks_and_missing_usage(fake):
    srv, url = fake
    srv.tokens_per_chunk = 3
    result = await run_load(config(url, output_tokens=LengthDist(7), concurrency=2))
    assert all(r.output_tokens == 7 and len(r.itl) == 2 for r in result.records), "usage counts tokens"
    assert result.summary["output_tokens"] == srv.tokens_sent == 8 * 7

    srv.include_usage = False  # no usage chunk: fall back to counting text chunks
    result = await run_load(config(url, output_tokens=LengthDist(7), concurrency=2))
    assert all(r.output_tokens == 3 and r.server_prompt_tokens is None for r in result.records)


async def test_http_errors_are_counted_with_status(fake):
    srv, url = fake
    srv.statuses = [200, 500, 429, 200]
    result = await run_load(config(url, concurrency=1, num_requests=8))
    s = result.summary
    assert (s["completed"], s["errors"]) == (4, 4)
    assert s["errors_by_kind"] == {"500": 2, "429": 2}
    assert [r.status for r in result.records] == [200, 500, 429, 200] * 2
    assert s["first_errors"][0].startswith("HTTP 500") and "fake failure 500" in s["first_errors"][0]
    assert s["output_tokens"] == 4 * 6, "failed requests add no tokens"


async def test_unreachable_server_fails_requests_not_the_run():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    result = await run_load(config(f"http://127.0.0.1:{port}/v1", num_requests=3, warmup=1, timeout=2))
    assert result.summary["errors"] == 3 and result.summary["errors_by_kind"] == {"exception": 3}
    assert "ConnectError" in result.summary["first_errors"][0] and result.warmup_errors


async def test_poisson_respects_num_requests_and_max_seconds(fake):
    srv, url = fake
    result = await run_load(config(url, rate=40.0, num_requests=12, warmup=1))
    assert result.summary["completed"] == 12 and len(srv.bodies) == 13
    assert [r.index for r in result.records] == list(range(12))

    begin = time.monotonic()
    result = await run_load(config(url, rate=10.0, num_requests=10_000, max_seconds=0.5))
    assert 1 <= result.summary["requests"] <= 25, "no new requests after max_seconds"
    assert time.monotonic() - begin < 3
    assert max(r.start for r in result.records) < 0.6


async def test_write_results_json_png_and_cli(fake, tmp_path):
    srv, url = fake
    result = await run_load(config(url, concurrency=2, api_key="s3cret", label="lib"))
    png = write_results(result, tmp_path / "run.json")
    doc = json.loads((tmp_path / "run.json").read_text())
    assert png.stat().st_size > 10_000 and doc["label"] == "lib" and len(doc["records"]) == 8
    assert doc["config"]["api_key"] == "***" and "s3cret" not in (tmp_path / "run.json").read_text()
    assert srv.auth[-1] == "Bearer s3cret"

    out = tmp_path / "cli" / "cli.json"
    cli = [sys.executable, "-m", "kvmesh.loadtest.openai_load", "--base-url", url, "--model", "fake"]
    cli += ["--endpoint", "completions", "--concurrency", "2", "--num-requests", "4", "--warmup", "1"]
    cli += ["--output-tokens", "4", "--prompt-tokens", "16", "--label", "cli", "--out", str(out)]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "TTFT" in proc.stdout and "4 ok, 0 errors" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["summary"]["completed"] == 4 and doc["summary"]["output_tokens"] == 16
    assert out.with_suffix(".png").exists() and doc["config"]["endpoint"] == "completions"


def test_length_distributions():
    rng = random.Random(0)
    assert {LengthDist(100).sample(rng) for _ in range(50)} == {100}
    uniform = [LengthDist(100, "uniform", 20).sample(rng) for _ in range(2000)]
    assert min(uniform) >= 80 and max(uniform) <= 120 and len(set(uniform)) > 30
    normal = [LengthDist(100, "normal", 10).sample(rng) for _ in range(2000)]
    assert 97 < sum(normal) / len(normal) < 103 and max(normal) > 115
    assert min(LengthDist(2, "normal", 50).sample(rng) for _ in range(200)) == 1
    with pytest.raises(ValueError):
        LengthDist(10, "zipf")
    with pytest.raises(ValueError):
        LoadConfig(base_url="http://x/v1", model="m", concurrency=2, rate=1.0)


def test_prompts_share_only_the_system_prompt():
    cfg = config("http://x/v1", num_requests=50, warmup=2, system_prompt_tokens=20)
    requests = build_requests(cfg, random.Random(0))
    assert [r.index for r in requests] == list(range(-2, 50))
    systems = {r.body["messages"][0]["content"] for r in requests}
    users = [r.body["messages"][1]["content"] for r in requests]
    assert len(systems) == 1 and len(systems.pop().split()) == 20
    assert all(len(u.split()) == 32 for u in users) and all(r.prompt_tokens == 52 for r in requests)
    salts = [tuple(u.split()[:4]) for u in users]
    assert len(set(salts)) == len(salts)
    again = build_requests(cfg, random.Random(0))
    assert [r.body["messages"][1]["content"].split()[4:] for r in again] == [u.split()[4:] for u in users]
    assert again[0].body["messages"][1]["content"] != users[0], "salts are fresh on every run"


def test_tokenizer_gives_exact_prompt_lengths(default_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    cfg = config("http://x/v1", endpoint="completions", prompt_tokens=LengthDist(64, "uniform", 30))
    for r in build_requests(cfg, random.Random(1), tokenizer):
        assert len(tokenizer.encode(r.body["prompt"], add_special_tokens=False)) == r.prompt_tokens


def test_summarize_percentiles_and_in_flight():
    records = [
        RequestRecord(i, 10, 4, start=i * 0.1, end=i * 0.1 + 0.25, e2e=0.25, ttft=(i + 1) / 100, tpot=0.05)
        for i in range(10)
    ]
    records[0].itl = [0.01, 0.03]
    records.append(RequestRecord(10, 10, 4, start=0.0, end=0.1, e2e=0.1, status=503, error="HTTP 503: busy"))
    s = summarize(records)
    assert s["ttft_ms"] == {"n": 10, "mean": 55.0, "p50": 55.0, "p90": 91.0, "p99": 99.1}
    assert s["itl_ms"]["n"] == 2 and s["itl_ms"]["mean"] == 20.0
    assert s["max_in_flight"] == 3  # a start every 100 ms, each lasting 250 ms; the failed one ends at 0.1
    assert s["errors_by_kind"] == {"503": 1} and s["first_errors"] == ["HTTP 503: busy"]
    assert s["duration_s"] == pytest.approx(1.15) and s["completed"] == 10
