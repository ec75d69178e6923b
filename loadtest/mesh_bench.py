"""What the mesh costs over the bare engine: the same streamed workload, same run, two ways.

  engine  the engine in this process (AsyncLLM), prompts rendered with the chat template here:
          no HTTP, no NATS, no tokenizer or router hops.
  mesh    `kvmesh up`'s processes (nats-server, tokenizer, router, one worker, gateway), driven over
          HTTP by the streaming OpenAI load generator (openai_load.py).
Workloads: concurrency 1 and 8, ~256-token chat prompts, 64 output tokens, ignore_eos.
Both stay loaded for the whole run and take turns, round after round (the first in one round goes
second in the next): this machine's background load then falls on both alike. Every statistic
(TTFT/ITL percentiles, tok/s, the c8 ratio) is the median over rounds of that round's own value.
Targets: mesh adds <= 10 ms to TTFT p50 and <= 2 ms to inter-token p50 at concurrency 1; mesh
output tok/s >= 90 % of the engine's at concurrency 8.

    python -m kvmesh.loadtest.mesh_bench   -> loadtest/results/mesh_bench.json (+ .png)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from pathlib import Path

from kvmesh.libs.threads import configure_threads
from kvmesh.loadtest.load_report import pct_ms

RESULTS = Path(__file__).resolve().parent / "results"


async def engine_run(llm, tokenizer, prepared, concurrency: int, tag: str) -> dict:
    """The prepared requests straight into the in-process engine, `concurrency` at a time (warm-ups
    first, one at a time). TTFT counts from the request's text: chat template and tokenization
    included, as in any server."""
    from kvmesh.libs.engine.sampling_params import SamplingParams

    ttft, itl = [], []
    tokens = 0
    queue = [p for p in prepared if p.index >= 0]
    warm = [p for p in prepared if p.index < 0]

    async def one(p, measure: bool) -> None:
        nonlocal tokens
        t0 = last = time.perf_counter()  # TTFT from the request's text, as a server counts it
        text = tokenizer.apply_chat_template(p.body["messages"], add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        params = SamplingParams(max_tokens=p.max_tokens, temperature=0, ignore_eos=True)
        first = True
        async for out in llm.generate(f"e{p.index}-{concurrency}-{tag}-{measure}", ids, params):
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
    return {"output_tok_s": tokens / (time.perf_counter() - start), "ttft": ttft, "itl": itl}


def mesh_samples(load) -> dict:
    """The load generator's run as raw samples, like engine_run's."""
    ok = [r for r in load.records if r.error is None]
    return {
        "output_tok_s": load.summary["output_tok_s"],
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "itl": [x for r in ok for x in r.itl],
        "errors": len(load.records) - len(ok),
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


def per_round(runs: list[dict], key: str) -> dict:
    """The median over rounds of each round's own statistic: a round that a burst of load from
    elsewhere slowed down does not move it (pooling every round's samples would let it)."""
    if key == "output_tok_s":
        return {"output_tok_s": statistics.median(r["output_tok_s"] for r in runs)}
    out = {}
    for q in (50, 90):
        rounds = [pct_ms(r[key], q) for r in runs]
        out[f"{key}_p{q}_ms"] = statistics.median(rounds)
        out[f"{key}_p{q}_ms_rounds"] = [round(x, 2) for x in rounds]
    return out


def combine(runs: list[dict]) -> dict:
    out: dict = {}
    for key in ("output_tok_s", "ttft", "itl"):
        out |= per_round(runs, key)
    out["rounds_tok_s"] = [round(r["output_tok_s"], 2) for r in runs]
    out["errors"] = sum(r.get("errors", 0) for r in runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16, help="measured requests per c8 run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating engine/mesh rounds")
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
        "c1": dict(concurrency=1, num_requests=max(6, args.requests // 2)),
        "c8": dict(concurrency=8, num_requests=args.requests),
    }
    runs: dict[str, dict[str, list[dict]]] = {name: {"engine": [], "mesh": []} for name in configs}
    loads: list[list[float]] = []

    async def bench(mesh: Mesh) -> None:
        # Both targets stay loaded for the whole run and take turns (engine, mesh, then mesh, engine,
        # ...), so that load from elsewhere on the machine falls on both alike. An idle engine
        # thread blocks on its command queue and its OpenMP threads sleep: it costs the other nothing.
        llm = AsyncLLM(lambda: LLMEngine(EngineConfig(dtype="bfloat16"), load_tokenizer=False))
        await llm.ready()
        for r in range(args.rounds):
            for name, kw in configs.items():
                cfg = LoadConfig(
                    base_url=f"{mesh.base_url}/v1",
                    model=folder.name,
                    prompt_tokens=LengthDist(225),
                    output_tokens=LengthDist(64),
                    seed=r,
                    progress=False,
                    **kw,
                )
                order = ("engine", "mesh") if r % 2 == 0 else ("mesh", "engine")
                for target in order:
                    if target == "engine":
                        reqs = build_requests(cfg, random.Random(r), None)
                        out = await engine_run(llm, tokenizer, reqs, cfg.concurrency, f"r{r}")
                    else:
                        load = await run_load(cfg)
                        out = mesh_samples(load)
                    runs[name][target].append(out)
                    loads.append([round(x, 2) for x in os.getloadavg()])
                    print(
                        f"  round {r + 1}/{args.rounds} {name} {target}: {out['output_tok_s']:.1f} tok/s, "
                        f"load {loads[-1][0]}",
                        flush=True,
                    )
        llm.shutdown()

    print(f"the mesh (1 worker) and the engine in this process, {args.rounds} alternating rounds", flush=True)
    with Mesh(MeshConfig(num_workers=1, log_dir=RESULTS / "mesh_bench_logs")) as mesh:
        mesh.wait_ready(300)
        asyncio.run(bench(mesh))

    result: dict = {name: {t: combine(v) for t, v in per.items()} for name, per in runs.items()}
    c1 = result["c1"]
    engine_c8, mesh_c8 = runs["c8"]["engine"], runs["c8"]["mesh"]
    ratios = [m["output_tok_s"] / e["output_tok_s"] for e, m in zip(engine_c8, mesh_c8, strict=True)]
    result["overhead"] = {
        "ttft_p50_added_ms_c1": c1["mesh"]["ttft_p50_ms"] - c1["engine"]["ttft_p50_ms"],
        "itl_p50_added_ms_c1": c1["mesh"]["itl_p50_ms"] - c1["engine"]["itl_p50_ms"],
        "tok_s_ratio_c8": statistics.median(ratios),
        "tok_s_ratio_c8_rounds": [round(x, 3) for x in ratios],
        "vllm_cpu_reference_c8_tok_s": 149.0,
    }
    result["targets"] = {
        "ttft_added_le_10ms": result["overhead"]["ttft_p50_added_ms_c1"] <= 10,
        "itl_added_le_2ms": result["overhead"]["itl_p50_added_ms_c1"] <= 2,
        "c8_ratio_ge_0.9": result["overhead"]["tok_s_ratio_c8"] >= 0.9,
    }
    result["load_average"] = loads
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result["overhead"], indent=1), json.dumps(result["targets"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
