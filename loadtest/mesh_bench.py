"""What the mesh costs over the bare engine: the same streamed workload, same run, two ways.

  engine  the engine in this process (AsyncLLM), prompts rendered with the chat template here:
          no HTTP, no NATS, no tokenizer or router hops.
  mesh    `kvmesh up`'s processes (nats-server, tokenizer, router, one worker, gateway), driven over
          HTTP by the streaming OpenAI load generator (openai_load.py).
Workloads: concurrency 1 and 8, ~256-token chat prompts, 64 output tokens, ignore_eos.
Targets: mesh adds <= 10 ms to TTFT p50 and <= 2 ms to inter-token p50 at concurrency 1; mesh
output tok/s >= 90 % of the engine's at concurrency 8.

    python -m kvmesh.loadtest.mesh_bench   -> loadtest/results/mesh_bench.json (+ .png)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import random
import time
from pathlib import Path

from kvmesh.libs.threads import configure_threads
from kvmesh.loadtest.load_report import pct_ms

RESULTS = Path(__file__).resolve().parent / "results"


async def engine_run(llm, tokenizer, prepared, concurrency: int) -> dict:
    from kvmesh.libs.engine.sampling_params import SamplingParams

    ttft, itl = [], []
    tokens = 0
    queue = [p for p in prepared if p.index >= 0]
    warm = [p for p in prepared if p.index < 0]

    async def one(p, measure: bool) -> None:
        nonlocal tokens
        ids = tokenizer.apply_chat_template(p.body["messages"], add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(ids, add_special_tokens=False)
        params = SamplingParams(max_tokens=p.max_tokens, temperature=0, ignore_eos=True)
        t0 = last = time.perf_counter()
        first = True
        async for out in llm.generate(f"e{p.index}-{concurrency}-{measure}", ids, params):
            now = time.perf_counter()
            if out.new_token_ids and measure:
                (ttft if first else itl).append(now - (t0 if first else last))
                tokens += len(out.new_token_ids)
                first = False
            last = now

    for p in warm:
        await one(p, False)
    start = time.perf_counter()

    async def client() -> None:
        while queue:
            await one(queue.pop(0), True)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "output_tok_s": tokens / elapsed,
        "ttft_p50_ms": pct_ms(ttft, 50),
        "ttft_p90_ms": pct_ms(ttft, 90),
        "itl_p50_ms": pct_ms(itl, 50),
        "itl_p90_ms": pct_ms(itl, 90),
    }


def mesh_summary(summary: dict) -> dict:
    return {
        "output_tok_s": summary["output_tok_s"],
        "ttft_p50_ms": summary["ttft_ms"]["p50"],
        "ttft_p90_ms": summary["ttft_ms"]["p90"],
        "itl_p50_ms": summary["itl_ms"]["p50"],
        "itl_p90_ms": summary["itl_ms"]["p90"],
        "errors": summary["errors"],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, label) in zip(
        axes,
        [
            ("ttft_p50_ms", "TTFT p50 (ms)"),
            ("itl_p50_ms", "inter-token p50 (ms)"),
            ("output_tok_s", "output tok/s"),
        ],
        strict=True,
    ):
        for i, conc in enumerate(("c1", "c8")):
            e, m = result[conc]["engine"][key], result[conc]["mesh"][key]
            ax.bar([i - 0.2], [e], 0.4, color="#999", label="engine in-process" if i == 0 else None)
            ax.bar([i + 0.2], [m], 0.4, color="#2a7", label="mesh over HTTP+NATS" if i == 0 else None)
            ax.text(i - 0.2, e, f"{e:.1f}", ha="center", va="bottom", fontsize=8)
            ax.text(i + 0.2, m, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks([0, 1], ["concurrency 1", "concurrency 8"])
        ax.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32, help="measured requests per workload")
    parser.add_argument("--out", type=Path, default=RESULTS / "mesh_bench.json")
    args = parser.parse_args()
    configure_threads(None)
    from transformers import AutoTokenizer

    from kvmesh.libs.engine.async_engine import AsyncLLM
    from kvmesh.libs.engine.config import EngineConfig
    from kvmesh.libs.engine.engine import LLMEngine
    from kvmesh.libs.engine.model_store import resolve_model
    from kvmesh.libs.launcher import Mesh, MeshConfig
    from kvmesh.loadtest.openai_load import LengthDist, LoadConfig, build_requests, run_load

    folder = resolve_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    configs = {
        "c1": dict(concurrency=1, num_requests=max(8, args.requests // 2)),
        "c8": dict(concurrency=8, num_requests=args.requests),
    }
    prepared = {}
    for name, kw in configs.items():
        cfg = LoadConfig(
            base_url="", model=folder.name, prompt_tokens=LengthDist(225), output_tokens=LengthDist(64), **kw
        )
        prepared[name] = (cfg, build_requests(cfg, random.Random(0), None))
    result: dict = {name: {} for name in configs}

    print("[1/2] engine in this process", flush=True)

    async def run_engine() -> None:
        # built in the engine thread, exactly as the worker does it (see async_engine.py)
        llm = AsyncLLM(lambda: LLMEngine(EngineConfig(dtype="bfloat16"), load_tokenizer=False))
        await llm.ready()
        for name, (cfg, reqs) in prepared.items():
            result[name]["engine"] = await engine_run(llm, tokenizer, reqs, cfg.concurrency)
            print(f"  {name}: {result[name]['engine']}", flush=True)
        llm.shutdown()

    asyncio.run(run_engine())
    gc.collect()  # the engine's weights and KV cache go before the mesh's worker loads its own

    print("[2/2] the mesh (1 worker) over HTTP", flush=True)
    with Mesh(MeshConfig(num_workers=1, log_dir=RESULTS / "mesh_bench_logs")) as mesh:
        mesh.wait_ready(300)
        for name, (cfg, _) in prepared.items():
            load = asyncio.run(
                run_load(dataclasses.replace(cfg, base_url=f"{mesh.base_url}/v1", progress=False))
            )
            result[name]["mesh"] = mesh_summary(load.summary)
            print(f"  {name}: {result[name]['mesh']}", flush=True)

    c1, c8 = result["c1"], result["c8"]
    result["overhead"] = {
        "ttft_p50_added_ms_c1": c1["mesh"]["ttft_p50_ms"] - c1["engine"]["ttft_p50_ms"],
        "itl_p50_added_ms_c1": c1["mesh"]["itl_p50_ms"] - c1["engine"]["itl_p50_ms"],
        "tok_s_ratio_c8": c8["mesh"]["output_tok_s"] / c8["engine"]["output_tok_s"],
        "vllm_cpu_reference_c8_tok_s": 149.0,
    }
    result["targets"] = {
        "ttft_added_le_10ms": result["overhead"]["ttft_p50_added_ms_c1"] <= 10,
        "itl_added_le_2ms": result["overhead"]["itl_p50_added_ms_c1"] <= 2,
        "c8_ratio_ge_0.9": result["overhead"]["tok_s_ratio_c8"] >= 0.9,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result["overhead"], indent=1), json.dumps(result["targets"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
