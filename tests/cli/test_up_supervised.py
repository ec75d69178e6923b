"""`kvmesh up` keeps serving while its processes die: a SIGKILLed worker, tokenizer, router, kv-index
replica or gateway is restarted by the supervisor (libs/supervisor.py), which prints it back once
healthy; no client request fails meanwhile, and greedy streams that moved off the dead worker keep the
text of an undisturbed run. The real console script in a subprocess, real processes, the official
OpenAI client."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import openai
from kvmesh_up import KvmeshUp

from kvmesh.libs.bus import Bus, decode
from kvmesh.schemas.messages import GenerateRequest

HANG_GUARD_S = 90.0  # restart + model load on a loaded 2-core machine: seconds; a hang: never
PROMPTS = [f"Tell me fact number {i} about the sea." for i in range(6)]
# Long enough (the tiny model: ~2-5 ms a token) that the kill, sent when a stream's first chunk is
# seen on NATS, lands mid-stream even on a loaded machine: a stream that ended first proves nothing.
MAX_TOKENS = 256


def back_line(name: str) -> re.Pattern:
    return re.compile(rf"kvmesh: {re.escape(name)} back at \S+, healthy (?P<s>[\d.]+) s after it died")


def openai_client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120)


async def stream_text(client: openai.AsyncOpenAI, prompt: str) -> str:
    stream = await client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return text


class GenerateSpy:
    """Every generate request on NATS, (worker id, request), and the first chunk on each stream."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, GenerateRequest]] = []
        self.on_first_chunk = None  # called with the worker id of each stream's first message

    async def start(self, nats_url: str) -> Bus:
        bus = await Bus.connect(nats_url, "spy")
        workers: dict[str, str] = {}  # stream subject -> worker id

        async def on_generate(raw) -> None:
            request = decode(raw.data, GenerateRequest)
            workers[request.stream_subject] = raw.subject.split(".")[2]
            self.seen.append((workers[request.stream_subject], request))

        async def on_stream(raw) -> None:
            worker_id = workers.pop(raw.subject, None)
            if worker_id is not None and self.on_first_chunk is not None:
                self.on_first_chunk(worker_id)

        await bus.nc.subscribe("kvmesh.worker.*.generate", cb=on_generate)
        await bus.nc.subscribe("kvmesh.stream.>", cb=on_stream)
        await bus.nc.flush()
        return bus


def test_a_killed_worker_is_restarted_and_no_stream_fails_or_changes(tiny_chat_model_path, tmp_path):
    args = ["--workers", "2", "--port", "0", "--dtype", "float32", "--model", str(tiny_chat_model_path)]
    with KvmeshUp([*args, "--log-dir", str(tmp_path)]) as up:
        base = up.wait_ready()
        worker_1 = up.child_pid("--worker-id", "worker-1")

        async def scenario() -> tuple[list[str], list, float, GenerateSpy]:
            client = openai_client(base)
            undisturbed = await asyncio.gather(*(stream_text(client, p) for p in PROMPTS))
            spy = GenerateSpy()
            bus = await spy.start(up.nats_url())
            killed_at: list[float] = []

            def kill_on_worker_1(worker_id: str) -> None:
                # SIGKILL once a stream on worker-1 has sent its first tokens: 255 more to go
                if worker_id == "worker-1" and not killed_at:
                    os.kill(worker_1, signal.SIGKILL)
                    killed_at.append(time.monotonic())

            spy.on_first_chunk = kill_on_worker_1
            tasks = [asyncio.ensure_future(stream_text(client, p)) for p in PROMPTS]
            more = [asyncio.ensure_future(stream_text(client, p)) for p in PROMPTS]
            results = await asyncio.gather(*tasks, *more, return_exceptions=True)
            await bus.close()
            return undisturbed, results, killed_at[0] if killed_at else 0.0, spy

        undisturbed, results, killed_at, spy = asyncio.run(scenario())
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed == [], f"{len(failed)} failed requests: {failed[:3]}\n{up.output()}"
        assert killed_at, "no request reached worker-1 (the kill did not happen)"
        assert results == undisturbed + undisturbed, "a moved stream's text differs from the undisturbed run"
        migrated = [r.request_id for _, r in spy.seen if r.migrated]
        assert migrated, "no stream was in flight on worker-1 when it died: nothing was proven"

        up.wait_for(r"kvmesh: worker-1 died \(killed by SIGKILL\)", 30)
        back = up.wait_for(back_line("worker-1"), HANG_GUARD_S)
        print(
            f"worker-1 back {time.monotonic() - killed_at:.1f} s after the kill (supervisor: {back['s']} s)"
        )
        assert up.child_pid("--worker-id", "worker-1") != worker_1
        assert_worker_serves(up, base, "worker-1")
        r = httpx.get(f"{base}/ready", timeout=10)
        assert r.status_code == 200 and r.json()["workers"] == ["worker-0", "worker-1"], r.text
    assert "kvmesh: restarts: worker-1 1" in up.lines, up.output()


def assert_worker_serves(up: KvmeshUp, base: str, worker_id: str) -> None:
    """Requests until the router sends one to `worker_id` (its choice among idle equals is random), and
    that one completes."""

    async def until_routed_there() -> None:
        spy = GenerateSpy()
        bus = await spy.start(up.nats_url())
        client = openai_client(base)
        try:
            for i in range(40):  # P(40 misses) with 2 equal workers: 2**-40
                text = await stream_text(client, f"Are you there, number {i}?")
                assert text
                if any(w == worker_id for w, _ in spy.seen):
                    return
            raise AssertionError(f"no request reached {worker_id}: {[w for w, _ in spy.seen]}")
        finally:
            await bus.close()

    asyncio.run(until_routed_there())


def test_killed_control_plane_replicas_are_restarted_and_no_request_fails(tiny_chat_model_path, tmp_path):
    replicas = ["--tokenizer-replicas", "2", "--router-replicas", "2", "--kv-index-replicas", "2"]
    args = ["--workers", "1", "--port", "0", "--model", str(tiny_chat_model_path), *replicas]
    victims = ["tokenizer-1", "router-1", "kv-index-1"]
    with KvmeshUp([*args, "--log-dir", str(tmp_path)]) as up:
        base = up.wait_ready()
        pids = {}
        for name in victims:  # replicas share a command line; their metrics port tells them apart
            port = up.wait_for(rf"kvmesh:\s+{name}\s+metrics http://127\.0\.0\.1:(?P<port>\d+)/", 5)["port"]
            pids[name] = up.child_pid("-m", env={"KVMESH_METRICS_PORT": port})

        async def load_while_killing() -> list:
            client = openai_client(base)
            results: list = []
            stop = asyncio.Event()

            async def user(k: int) -> None:
                i = 0
                while not stop.is_set() and i < 500:  # bounded: a few hundred short requests at most
                    try:
                        results.append(await stream_text(client, f"user {k} request {i}"))
                    except Exception as exc:
                        results.append(exc)
                    i += 1

            users = [asyncio.ensure_future(user(k)) for k in range(4)]
            while len(results) < 8 and not any(u.done() for u in users):
                await asyncio.sleep(0.05)  # polling the load's own progress, bounded by the users' bound
            for name in victims:
                os.kill(pids[name], signal.SIGKILL)
            await asyncio.to_thread(lambda: [up.wait_for(back_line(n), HANG_GUARD_S) for n in victims])
            done_at_back = len(results)
            while len(results) < done_at_back + 8 and not any(u.done() for u in users):
                await asyncio.sleep(0.05)  # and served a while with the restarted replicas
            stop.set()
            await asyncio.gather(*users)
            return results

        results = asyncio.run(load_while_killing())
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed == [], f"{len(failed)} of {len(results)} requests failed: {failed[:3]}\n{up.output()}"
        for name in victims:
            assert up.wait_for(rf"kvmesh: {name} died \(killed by SIGKILL\)", 5)
    summary = next(line for line in up.lines if line.startswith("kvmesh: restarts:"))
    for name in victims:
        assert f"{name} 1" in summary, summary


def test_a_killed_gateway_is_restarted_on_the_same_port(tiny_chat_model_path, tmp_path):
    with KvmeshUp(["--port", "0", "--model", str(tiny_chat_model_path), "--log-dir", str(tmp_path)]) as up:
        base = up.wait_ready()
        gateway = up.child_pid("-m", "kvmesh.services.gateway")
        os.kill(gateway, signal.SIGKILL)
        killed_at = time.monotonic()
        back = up.wait_for(back_line("gateway"), HANG_GUARD_S)
        print(f"gateway back {time.monotonic() - killed_at:.1f} s after the kill (supervisor: {back['s']} s)")
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert up.child_pid("-m", "kvmesh.services.gateway") != gateway
