"""Disaggregated serving across processes: a prefill worker and a decode worker (real model, fp32),
KV blocks moved by real NIXL transfers, requests through the real gateway and router."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import httpx
import openai
import pytest
from helpers import restart_worker

from kvmesh.libs.bus import Bus
from kvmesh.libs.launcher import Mesh, MeshConfig
from kvmesh.schemas.messages import RouterHealth, RouterHealthRequest, StatsRequest, Subjects, WorkerStats

MAX_TOKENS = 16
TOPICS = ["the sea", "a paged KV cache", "mountains in winter", "how bread is made", "trains", "bees"]


def passage(rng: random.Random, sentences: int) -> str:
    return " ".join(f"Line {i}: {rng.choice(TOPICS)}, {rng.randrange(1000)}." for i in range(sentences))


@pytest.fixture(scope="module")
def mesh(default_model_path, tmp_path_factory):
    config = MeshConfig(
        model=str(default_model_path),
        dtype="float32",
        num_workers=1,
        num_prefill_workers=1,
        worker_args=["--kv-cache-gb", "0.25", "--heartbeat-interval", "0.5"],
        prefill_worker_args=["--kv-cache-gb", "0.25", "--heartbeat-interval", "0.5", "--lease-s", "5"],
        router_args=["--disagg-min-tokens", "48"],
        log_dir=tmp_path_factory.mktemp("disagg-logs"),
    )
    with Mesh(config) as m:
        m.wait_ready(timeout=180)
        yield m


@pytest.fixture(scope="module")
def client(mesh):
    return openai.OpenAI(base_url=f"{mesh.base_url}/v1", api_key="unused", max_retries=0)


async def _ask(mesh: Mesh, subject: str, msg, reply_type):
    bus = await Bus.connect(mesh.nats_url, "test")
    try:
        return await bus.request(subject, msg, reply_type, timeout=10)
    finally:
        await bus.close()


def stats(mesh: Mesh, wid: str) -> WorkerStats:
    ask = StatsRequest(check_integrity=True)
    return asyncio.run(_ask(mesh, Subjects.worker(wid, "stats"), ask, WorkerStats))


def chat(client, text: str) -> str:
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": text}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    return r.choices[0].message.content


def expected(hf_greedy, text: str) -> str:
    """transformers' greedy answer (fp32): the independent oracle the mesh must equal."""
    return hf_greedy.chat([{"role": "user", "content": text}], MAX_TOKENS)


def test_disaggregated_output_equals_transformers(mesh, client, hf_greedy):
    rng = random.Random(7)
    texts = [passage(rng, n) for n in (1, 8, 16, 40)]  # ~30 to ~600 prompt tokens
    before = stats(mesh, "worker-0")
    for text in texts:
        assert chat(client, text) == expected(hf_greedy, text)
    after = stats(mesh, "worker-0")
    assert after.remote_prefills - before.remote_prefills >= 3, "the long prompts were prefilled remotely"
    assert after.kv_blocks_pulled > before.kv_blocks_pulled
    assert after.local_prefill_fallbacks == before.local_prefill_fallbacks, "no fallback"
    health = asyncio.run(_ask(mesh, Subjects.ROUTER_HEALTH, RouterHealthRequest(), RouterHealth))
    assert health.decisions.get("prefill_remote", 0) >= 3 and health.decisions.get("prefill_short", 0) >= 1
    assert "worker-0" in health.workers and "prefill-0" in health.workers


def test_a_warm_prefix_pulls_fewer_blocks(mesh, client, hf_greedy):
    rng = random.Random(8)
    shared = passage(rng, 30)
    pulled = []
    for question in ("What is the first topic?", "Which number comes last?"):
        text = f"{shared}\n{question}"
        before = stats(mesh, "worker-0").kv_blocks_pulled
        assert chat(client, text) == expected(hf_greedy, text)
        pulled.append(stats(mesh, "worker-0").kv_blocks_pulled - before)
    assert pulled[0] >= 20, pulled
    assert pulled[1] < pulled[0] // 4, f"the shared prefix was already on the decode worker: {pulled}"


def test_randomized_traffic_leaves_both_pools_whole(mesh, client, hf_greedy):
    rng = random.Random(9)
    texts = [passage(rng, rng.randrange(1, 30)) for _ in range(10)]

    async def one(text: str, abort: bool) -> None:
        async with httpx.AsyncClient(base_url=f"{mesh.base_url}/v1", timeout=60) as http:
            body = {
                "model": "SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": text}],
                "max_tokens": 24,
                "stream": True,
            }
            async with http.stream("POST", "/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if abort and line.startswith("data:"):
                        return  # the client leaves mid-stream
                    if line == "data: [DONE]":
                        return

    async def all_of_them() -> None:
        await asyncio.gather(*(one(t, rng.random() < 0.3) for t in texts))

    asyncio.run(all_of_them())
    deadline = time.monotonic() + 30
    while True:  # aborted requests and leases settle within moments
        d, p = stats(mesh, "worker-0"), stats(mesh, "prefill-0")
        settled = all(s.num_free_blocks == s.num_blocks and s.num_leased_blocks == 0 for s in (d, p))
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for s in (d, p):
        assert s.integrity_error is None, s
        assert s.num_free_blocks == s.num_blocks and s.num_leased_blocks == 0, s


async def chat_killing_on_prefill_request(mesh: Mesh, client, text: str, victim: str) -> str:
    """Sends `text` and SIGKILLs the prefill worker `victim` the moment the decode worker asks it to
    compute the prompt (a copy of that request reaches this subscriber too): the worker dies with the
    request in hand, whatever the machine's speed. Returns the answer."""
    bus = await Bus.connect(mesh.nats_url, "test-killer")
    try:
        _sub, asked = await bus.subscribe_queue(Subjects.worker(victim, "prefill"))
        answer = asyncio.create_task(asyncio.to_thread(chat, client, text))
        await asyncio.wait_for(asked.get(), 120)
        mesh.proc(victim).send_signal(signal.SIGKILL)
        return await asyncio.wait_for(answer, 120)
    finally:
        await bus.close()


def test_prefill_worker_killed_mid_request_falls_back(mesh, client, hf_greedy):
    """Kills the prefill worker while it holds a request; restarts it after."""
    text = passage(random.Random(10), 60)  # ~1,200 tokens: well above --disagg-min-tokens
    want = expected(hf_greedy, text)
    before = stats(mesh, "worker-0")
    try:
        assert asyncio.run(chat_killing_on_prefill_request(mesh, client, text, "prefill-0")) == want
        assert mesh.proc("prefill-0").wait(5) == -signal.SIGKILL
        after = stats(mesh, "worker-0")
        assert after.local_prefill_fallbacks == before.local_prefill_fallbacks + 1
        assert after.remote_prefills == before.remote_prefills
        assert chat(client, "Say hi.") == expected(hf_greedy, "Say hi."), "the mesh keeps serving without it"
    finally:
        restart_worker(mesh, "prefill-0")  # the mesh is shared by this module: leave it whole
