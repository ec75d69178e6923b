"""nats-server killed (SIGKILL) and restarted on its port with the same JetStream store, under a
running mesh with a request streaming: that request completes with the text of an undisturbed greedy
run, no service is restarted, every one reconnects, new requests succeed, and KV events flow again.

The gateway is the last to reconnect (it is paused until every worker's heartbeat has come through the
restarted server), so the chunks its worker sent meanwhile are lost for certain: only the gateway's
request migration (a gap in the chunk positions, or a worker that no longer runs the request) can
complete the stream. Left to chance, the gateway sometimes subscribes again before the worker flushes
what it buffered during the outage, and nothing is lost."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from kvmesh.libs.bus import Bus, decode
from kvmesh.schemas.messages import Heartbeat, OverlapReply, Subjects

STORY = {
    "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
    "max_tokens": 48,
    "ignore_eos": True,
    "temperature": 0,
}


async def every_worker_heard(mesh, timeout: float = 60.0) -> None:
    """Until a heartbeat of each worker comes through the (restarted) server: each has reconnected, and
    a client flushes what it buffered while disconnected before anything it publishes afterwards."""
    bus = await Bus.connect(mesh.nats_url, "fault-probe", connect_timeout=2)
    try:
        _sub, beats = await bus.subscribe_queue(Subjects.WORKER_HEARTBEAT)
        heard: set[str] = set()
        async with asyncio.timeout(timeout):  # a hang guard, not a timing assertion
            while not heard >= set(mesh.worker_ids):
                heard.add(decode((await beats.get()).data, Heartbeat).stats.worker_id)
    finally:
        await bus.close()


async def stream_across_restart(mesh, model: str) -> tuple[str, str, float]:
    """Stream a chat; at its first token pause the gateway, kill NATS, restart it a second later, and
    resume the gateway once every worker has reconnected. Returns (outcome, text or error message,
    seconds from the kill to the end of the response)."""
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
                mesh.pause("gateway")
                try:
                    killed_at = time.monotonic()
                    await asyncio.to_thread(mesh.kill, "nats")
                    await asyncio.sleep(1.0)  # the outage (the worker keeps generating), not a wait
                    await asyncio.to_thread(mesh.restart, "nats")
                    await every_worker_heard(mesh)
                finally:
                    mesh.resume("gateway")
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
    assert outcome == "done", f"the stream across the NATS restart ended with {outcome}: {detail!r}"

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
    # Nothing lost or repeated: the text of an undisturbed (greedy) run of the same prompt.
    undisturbed = probe.http.post("/v1/chat/completions", json={**STORY, "model": probe.model})
    assert undisturbed.status_code == 200, undisturbed.text
    assert detail == undisturbed.json()["choices"][0]["message"]["content"]
    # The stream survived on disk, the kv-index consumes it again: old entries stay, new ones arrive.
    assert probe.overlap(first_hashes) == OverlapReply(overlap=held)
    after = probe.conversation("nats-after")
    assert probe.chat(after).status_code == 200
    assert probe.indexed(probe.block_hashes(after)), "KV events published after the restart are indexed"
    assert probe.router_health().kv_index_ok
