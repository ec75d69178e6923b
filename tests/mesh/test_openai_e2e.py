"""The official `openai` client against a running mesh (real processes, real NATS, real model)."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest
from helpers import restart_worker

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write one sentence about the moon.",
    "What is 2 plus 2?",
]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def expected(hf_greedy):
    """What the mesh must answer: transformers' greedy output (fp32), the independent oracle."""
    chat = [hf_greedy.chat([{"role": "user", "content": q}], MAX_TOKENS) for q in QUESTIONS]
    plain = [hf_greedy.complete(q, MAX_TOKENS) for q in QUESTIONS]
    return {"chat": chat, "completion": plain}


def test_sync_chat_and_completions_equal_transformers(client, model, expected):
    for q, want in zip(QUESTIONS, expected["chat"], strict=True):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}], max_tokens=MAX_TOKENS, temperature=0
        )
        assert r.choices[0].message.content == want
        assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    for q, want in zip(QUESTIONS, expected["completion"], strict=True):
        r = client.completions.create(model=model, prompt=q, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == want


def test_streaming_equals_non_streaming(client, model, expected):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["chat"][0]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


async def test_async_client_32_concurrent_streams_stay_in_order(mesh, model, expected):
    aclient = openai.AsyncOpenAI(base_url=f"{mesh.base_url}/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> tuple[int, str]:
        q = QUESTIONS[i % len(QUESTIONS)]
        stream = await aclient.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": q}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
        )
        return i, "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    results = await asyncio.gather(*(one(i) for i in range(32)))
    for i, text in results:
        # each stream carries exactly its own answer, in order: nothing lost, nothing interleaved
        assert text == expected["chat"][i % len(QUESTIONS)], f"stream {i}"
    await aclient.close()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 2.0}, 400, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": 7}, 400, "stop"),
        ({"messages": []}, 400, None),
        ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, None),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"}, 404, None),
    ],
)
def test_bad_input_gets_openai_errors_and_the_mesh_keeps_serving(mesh, model, body, status, param):
    body = {"model": model, **body}
    r = httpx.post(f"{mesh.base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param
    ok = httpx.post(
        f"{mesh.base_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        timeout=60,
    )
    assert ok.status_code == 200


def test_client_disconnect_frees_the_workers_blocks(mesh, model, worker_stats):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{mesh.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = 0
        for line in r.iter_lines():
            lines += bool(line)
            if lines >= 5:
                break  # leaving the block closes the connection mid-stream
    busy = True
    deadline = time.monotonic() + 15
    while busy and time.monotonic() < deadline:
        time.sleep(0.2)
        all_stats = [worker_stats(w) for w in mesh.worker_ids]
        busy = any(s.num_running or s.num_waiting or s.num_free_blocks != s.num_blocks for s in all_stats)
    assert not busy, f"blocks still held after the client left: {all_stats}"


def test_load_spreads_and_a_stopped_worker_is_survived(mesh, client, model, worker_stats):
    before = {w: worker_stats(w).prefix_query_tokens for w in mesh.worker_ids}

    def ask(i: int) -> str:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=8, temperature=0
        )
        return r.choices[0].message.content

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(ask, range(16)))
    after = {w: worker_stats(w).prefix_query_tokens for w in mesh.worker_ids}
    assert all(after[w] > before[w] for w in mesh.worker_ids), f"load did not spread: {before} -> {after}"

    victim = mesh.worker_ids[1]
    mesh.proc(victim).send_signal(signal.SIGTERM)
    try:
        mesh.proc(victim).wait(30)
        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(ask, range(8))), "requests keep succeeding on the remaining worker"
    finally:
        restart_worker(mesh, victim)  # the mesh is shared: leave it with both workers serving
