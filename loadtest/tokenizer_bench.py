"""How many tokens/s one tokenizer replica handles: in-process encode + block hashing, and the same
through NATS request/reply at several concurrencies (a real nats-server and a real tokenizer service).

    python -m kvmesh.loadtest.tokenizer_bench   -> loadtest/results/tokenizer_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from kvmesh.libs.threads import configure_threads

RESULTS = Path(__file__).resolve().parent / "results"


async def through_nats(nats_url: str, prompts: list[str], concurrency: int) -> dict:
    from kvmesh.libs.bus import Bus
    from kvmesh.schemas.messages import EncodeReply, EncodeRequest, EncodeResult, Subjects

    bus = await Bus.connect(nats_url, "bench")
    queue = list(enumerate(prompts))
    tokens = 0
    latencies = []

    async def client() -> None:
        nonlocal tokens
        while queue:
            i, p = queue.pop()
            t0 = time.perf_counter()
            r = await bus.request(
                Subjects.TOKENIZER_ENCODE, EncodeRequest(request_id=str(i), prompt=p), EncodeResult
            )
            latencies.append(time.perf_counter() - t0)
            assert isinstance(r, EncodeReply)
            tokens += len(r.token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await bus.close()
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "tokens_per_s": tokens / elapsed,
        "requests_per_s": len(prompts) / elapsed,
        "latency_p50_ms": latencies[len(latencies) // 2] * 1e3,
        "latency_p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "tokenizer_bench.json")
    args = parser.parse_args()
    configure_threads(1)
    from kvmesh.libs.engine.model_store import resolve_model
    from kvmesh.libs.launcher import free_port, start_nats_server
    from kvmesh.loadtest.workloads import WORDS
    from kvmesh.schemas.messages import EncodeRequest
    from kvmesh.services.tokenizer.service import TokenizerConfig, TokenizerService

    rng = random.Random(0)
    words = int(args.prompt_tokens / 1.3)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(args.requests)]
    svc = TokenizerService(TokenizerConfig(nats_url="", model="SmolLM2-135M-Instruct"), resolve_model())
    t0 = time.perf_counter()
    n = sum(len(svc.encode(EncodeRequest(request_id="x", prompt=p)).token_ids) for p in prompts)
    in_process = {"tokens_per_s": n / (time.perf_counter() - t0), "avg_prompt_tokens": n / len(prompts)}
    print(f"in process: {in_process['tokens_per_s']:,.0f} tokens/s (encode + block hashes)", flush=True)

    port = free_port()
    nats = start_nats_server(port, stderr=subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"
    tok = None
    try:
        tok = subprocess.Popen(
            [sys.executable, "-m", "kvmesh.services.tokenizer", "--nats-url", url, "--log-level", "WARNING"]
        )
        time.sleep(1.0)
        runs = []
        for c in (1, 4, 16):
            for _ in range(60):  # the service may still be loading its tokenizer
                try:
                    runs.append(asyncio.run(through_nats(url, prompts, c)))
                    break
                except Exception:
                    time.sleep(0.5)
            print(f"over NATS, concurrency {c}: {runs[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    finally:
        if tok:
            tok.terminate()
            tok.wait(10)
        nats.terminate()
    result = {"prompt_tokens": args.prompt_tokens, "in_process": in_process, "over_nats": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
