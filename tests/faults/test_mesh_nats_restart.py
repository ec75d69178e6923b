"""nats-server killed (SIGKILL) and restarted on its port with the same JetStream store, under a
running mesh with a request streaming: that request completes or fails with a clear error, no
service is restarted, every one reconnects, new requests succeed, and KV events flow again."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from kvmesh.schemas.messages import OverlapReply

STORY = {
    "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
    "max_tokens": 48,
    "ignore_eos": True,
    "temperature": 0,
}


async def stream_across_restart(mesh, model: str) -> tuple[str, str, float]:
    """Stream a chat; kill NATS at its first token and restart it a second later. Returns (outcome,
    text or error message, seconds from the kill to the end of the response)."""
    body = {**STORY, "model": model, "stream": True}
    text: list[str] = []
    killed_at = None

    def since_kill() -> float:
        assert killed_at is not None, "the request ended before NATS could be killed"
        return time.monotonic() - killed_at

    async with (
        httpx.AsyncClient(base_url=mesh.base_url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        if r.status_code != 200:
            return "error", (await r.aread()).decode(), 0.0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return "done", "".join(text), since_kill()
            event = json.loads(data)
            if "error" in event:
                return "error", event["error"]["message"], since_kill()
            text.append(event["choices"][0]["delta"].get("content") or "")
            if killed_at is None and "".join(text):
                killed_at = time.monotonic()
                await asyncio.to_thread(mesh.kill, "nats")
                await asyncio.sleep(1.0)
                await asyncio.to_thread(mesh.restart, "nats")
    return "cut", "".join(text), since_kill()


def test_nats_restart_services_reconnect_and_serve(fault_mesh, probe):
    probe.wait_whole()
    first = probe.conversation("nats-first")
    assert probe.chat(first).status_code == 200
    first_hashes = probe.block_hashes(first)
    held = probe.indexed(first_hashes)
    services = {p.name: p.popen.pid for p in fault_mesh.procs if p.name not in ("nats", "redis")}

    outcome, detail, seconds = asyncio.run(stream_across_restart(fault_mesh, probe.model))
    print(f"in-flight request across the NATS restart: {outcome} after {seconds:.1f} s: {detail[:200]!r}")
    assert outcome in ("done", "error"), f"the response was cut without an end: {detail!r}"
    if outcome == "error":
        assert detail, "an error says what happened"

    # Nobody had to restart: same processes, all alive.
    for p in fault_mesh.procs:
        if p.name in services:
            assert p.popen.pid == services[p.name] and p.popen.poll() is None, f"{p.name} died"
    # New requests succeed once the workers have beaten again (the routers' view of them is fresh).
    probe.until(
        lambda: probe.chat([{"role": "user", "content": "Hello again"}]).status_code == 200, "serving"
    )
    for i in range(4):  # spread over both tokenizer and router replicas
        r = probe.chat([{"role": "user", "content": f"Say {i}."}])
        assert r.status_code == 200, r.text
    if outcome == "done":  # nothing lost or repeated: the text of an undisturbed (greedy) run
        undisturbed = probe.http.post("/v1/chat/completions", json={**STORY, "model": probe.model})
        assert detail == undisturbed.json()["choices"][0]["message"]["content"]
    # The stream survived on disk, the kv-index consumes it again: old entries stay, new ones arrive.
    assert probe.overlap(first_hashes) == OverlapReply(overlap=held)
    after = probe.conversation("nats-after")
    assert probe.chat(after).status_code == 200
    assert probe.indexed(probe.block_hashes(after)), "KV events published after the restart are indexed"
    assert probe.router_health().kv_index_ok
