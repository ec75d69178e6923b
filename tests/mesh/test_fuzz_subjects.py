"""Random bytes on every kvmesh subject: no service crashes, the mesh keeps answering."""

import asyncio
import contextlib
import random

import httpx

from kvmesh.libs.bus import Bus
from kvmesh.schemas.messages import Subjects


async def spray(nats_url: str, worker_ids: list[str], rounds: int = 30) -> int:
    rng = random.Random(1234)
    subjects = [
        Subjects.TOKENIZER_ENCODE,
        Subjects.TOKENIZER_DETOKENIZE,
        Subjects.ROUTER_ROUTE,
        Subjects.ROUTER_HEALTH,
        Subjects.WORKER_HEARTBEAT,
        Subjects.KV_INDEX_OVERLAP,
        *[
            Subjects.every_replica(s)
            for s in (Subjects.TOKENIZER_ENCODE, Subjects.TOKENIZER_DETOKENIZE, Subjects.ROUTER_ROUTE)
        ],
        *[f"{Subjects.KV_EVENTS}.{w}" for w in worker_ids],
        *[Subjects.worker(w, verb) for w in worker_ids for verb in ("generate", "abort", "stats")],
    ]
    bus = await Bus.connect(nats_url, "fuzzer")
    sent = 0
    try:
        for _ in range(rounds):
            for subject in subjects:
                payload = rng.randbytes(rng.choice([0, 1, 7, 64, 1000]))
                if rng.random() < 0.3:  # something msgpack-shaped that is still not a valid message
                    payload = b"\x82\xa4type\xa9Finished.\xa1x" + payload[:8]
                with contextlib.suppress(Exception):  # no reply (publish-only subjects) is fine
                    await bus.nc.request(subject, payload, timeout=0.2)
                sent += 1
    finally:
        await bus.close()
    return sent


def test_random_bytes_on_every_subject_crash_nothing(mesh):
    sent = asyncio.run(spray(mesh.nats_url, mesh.worker_ids))
    assert sent > 300
    for p in mesh.procs:
        assert p.popen.poll() is None, f"{p.name} died"
    body = {"model": "x", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    body["model"] = httpx.get(f"{mesh.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    r = httpx.post(f"{mesh.base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
