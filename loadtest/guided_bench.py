"""What guided decoding costs: c8 output tok/s with a JSON schema vs without, on the same mesh in the
same run, rounds alternating (free, guided, free, guided ...; the first mode of a round pair swaps
each time), plus xgrammar's own per-token cost (mask fill + apply) measured in this process.

Both modes produce exactly `--max-tokens` tokens per request: free requests ignore EOS; guided ones
follow a schema whose array needs more items than the budget allows (so they end on `length`, never
early), with strings bounded by a pattern. Each round sends `--requests` chat requests from 8 closed-loop
clients (each sends its next request when its previous one ends), prompts of fresh random words.

    python -m kvmesh.loadtest.guided_bench [--rounds 4] [--base-url URL]   -> results/guided_bench.json

Without --base-url it starts its own mesh (1 worker, `--dtype`, like `kvmesh up`) and stops it after.
The target (issue 19): guided >= 85 % of free.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from kvmesh.loadtest.workloads import WORDS

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "pattern": "^[A-Za-z ]{1,40}$"},
        "items": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-z ]{1,30}$"},
            "minItems": 200,  # more than any budget here: the request ends on max_tokens
        },
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}
CONCURRENCY = 8


def prompts(n: int, rng: random.Random) -> list[str]:
    return [f"List things about {' '.join(rng.choices(WORDS, k=12))}." for _ in range(n)]


async def one_round(client: httpx.AsyncClient, model: str, guided: bool, texts: list[str], max_tokens: int):
    queue = list(texts)
    tokens = 0
    finish: dict[str, int] = {}

    async def worker() -> None:
        nonlocal tokens
        while queue:
            prompt = queue.pop()
            body: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            if guided:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "list", "schema": SCHEMA},
                }
            else:
                body["ignore_eos"] = True
            r = await client.post("/chat/completions", json=body)
            r.raise_for_status()
            out = r.json()
            tokens += out["usage"]["completion_tokens"]
            reason = out["choices"][0]["finish_reason"]
            finish[reason] = finish.get(reason, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    seconds = time.perf_counter() - start
    return {
        "mode": "guided" if guided else "free",
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "finish": finish,
    }


def mask_cost(model_path: Path, batch: int = 8, tokens: int = 64) -> dict[str, float]:
    """xgrammar's cost per guided token, in this process: filling a batch's bitmask rows and applying
    them to float32 logits (what libs/engine/guided.py does each step), over real schema output."""
    import torch
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    vocab = json.loads((model_path / "config.json").read_text())["vocab_size"]
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab))
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - start
    text = json.dumps({"title": "A list", "items": ["apples and pears"] * 40})
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, vocab)
    logits = torch.randn(batch, vocab)
    fill = apply = 0.0
    for token in ids:
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        t1 = time.perf_counter()
        masked = logits.clone()
        xgr.apply_token_bitmask_inplace(masked, bitmask, vocab_size=vocab, indices=list(range(batch)))
        t2 = time.perf_counter()
        fill, apply = fill + t1 - t0, apply + t2 - t1
        for m in matchers:
            assert m.accept_token(token)
    n = len(ids) * batch
    return {
        "compile_ms": compile_s * 1e3,
        "fill_us_per_token": fill / n * 1e6,
        "apply_us_per_token": apply / n * 1e6,
        "batch": batch,
        "tokens": len(ids),
    }


async def serve_rounds(base_url: str, args: argparse.Namespace) -> list[dict]:
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        model = (await client.get("/models")).json()["data"][0]["id"]
        await one_round(client, model, True, prompts(2, rng), 8)  # warm-up: compiles the schema
        rounds = []
        for r in range(args.rounds):
            texts = prompts(args.requests, rng)
            order = (False, True) if r % 2 == 0 else (True, False)
            for guided in order:
                result = await one_round(client, model, guided, texts, args.max_tokens)
                rounds.append({"round": r, **result})
                print(
                    f"round {r} {result['mode']:6s} {result['tok_s']:7.1f} tok/s {result['finish']}",
                    flush=True,
                )
        return rounds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help="an OpenAI base URL (…/v1); default: start a mesh")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--requests", type=int, default=16, help="requests per round and mode")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="auto", help="the mesh's workers (without --base-url)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "guided_bench.json")
    args = p.parse_args(argv)
    from kvmesh.libs.engine.model_store import resolve_model

    model_path = resolve_model()
    mask = mask_cost(model_path)
    print(f"xgrammar: {mask}", flush=True)
    if args.base_url:
        rounds = asyncio.run(serve_rounds(args.base_url, args))
    else:
        from kvmesh.libs.launcher import Mesh, MeshConfig

        with Mesh(MeshConfig(model=str(model_path), dtype=args.dtype, num_workers=1)) as mesh:
            mesh.wait_ready(timeout=300)
            rounds = asyncio.run(serve_rounds(f"{mesh.base_url}/v1", args))
    free = [r["tok_s"] for r in rounds if r["mode"] == "free"]
    guided = [r["tok_s"] for r in rounds if r["mode"] == "guided"]
    summary = {
        "free_tok_s_median": statistics.median(free),
        "guided_tok_s_median": statistics.median(guided),
        "guided_over_free": statistics.median(guided) / statistics.median(free),
        "target": 0.85,
    }
    print(json.dumps(summary, indent=1))
    out = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "concurrency": CONCURRENCY,
        "schema": SCHEMA,
        "mask": mask,
        "rounds": rounds,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
