"""Two replicas each of the tokenizer and router: one of each hung (SIGSTOP, not killed: its NATS
connection stays open, so its queue group keeps handing it requests). Every request must still be
answered, and answered right: the gateway's tries are short and hedged onto every replica
(services/gateway/control.py). Continued, the hung replicas serve again."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

PAUSED = ["tokenizer", "router"]  # replica 0 of each; "tokenizer-1" and "router-1" stay up


def answer(probe, question: str) -> str:
    """A fresh client per call: requests run in threads."""
    body = {
        "model": probe.model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 6,
        "temperature": 0,
    }
    with httpx.Client(base_url=probe.mesh.base_url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_hung_tokenizer_and_router_replicas_cost_time_not_requests(fault_mesh, probe):
    probe.wait_whole()
    questions = [f"What is {i} plus {i + 1}?" for i in range(10)]
    expected = {q: answer(probe, q) for q in questions}  # greedy: the same text every time
    try:
        for name in PAUSED:
            fault_mesh.pause(name)
        for q in questions:
            assert answer(probe, q) == expected[q], q
        with ThreadPoolExecutor(6) as pool:
            concurrent = questions[:6]
            for q, text in zip(concurrent, pool.map(lambda q: answer(probe, q), concurrent), strict=True):
                assert text == expected[q], q
    finally:
        for name in PAUSED:
            fault_mesh.resume(name)
    # Continued: each replica answers its health check again and the mesh serves as before.
    probe.wait_whole()
    for q in questions[:4]:
        assert answer(probe, q) == expected[q], q
