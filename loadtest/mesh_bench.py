"""What the mesh costs over the bare engine: the same streamed workload, same run, two ways.

  engine  the engine in this process (AsyncLLM), prompts rendered with the chat template here:
          no HTTP, no NATS, no tokenizer or router hops.
  mesh    `kvmesh up`'s processes (nats-server, tokenizer, router, one worker, gateway), driven over
          HTTP by the streaming OpenAI load generator (openai_load.py).
Workloads: concurrency 1 and 8, ~256-token chat prompts, 64 output tokens, ignore_eos.
Both stay loaded for the whole run and take turns, so that this machine's background load (its speed
drifts by 10-20 % over minutes) falls on both alike:
  c1  request by request: each prompt goes to both, one right after the other (who goes first
      alternates). TTFT/ITL percentiles are over all rounds' samples; `c1_paired` adds the median of
      the per-prompt differences and splits each TTFT into the engine's own prefill step (scheduled ->
      first token: the in-process engine's timing, the worker's Prometheus histogram) and the rest
      (template, tokenization, queueing, and for the mesh HTTP, NATS, tokenizer and router hops).
  c8  round by round (the first in one round goes second in the next); tok/s and the c8 ratio are
      medians over rounds of each round's own value.
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

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.libs.allocator_env import engine_allocator_env
from kvmesh.libs.threads import configure_threads
from kvmesh.loadtest.load_report import pct_ms

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("engine", "mesh")
SAMPLES = ("ttft", "itl", "prefill")  # per c1 request: seconds, its gaps, the engine's prefill step


async def engine_one(llm, tokenizer, p, tag: str) -> dict:
    """One prepared request into the in-process engine. TTFT counts from the request's text: chat
    template and tokenization included, as in any server."""
    from kvmesh.libs.engine.sampling_params import SamplingParams

    t0 = last = time.perf_counter()
    text = tokenizer.apply_chat_template(p.body["messages"], add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(max_tokens=p.max_tokens, temperature=0, ignore_eos=True)
    ttft, itl, tokens, prefill = None, [], 0, None
    async for out in llm.generate(f"e{p.index}-{tag}", ids, params):
        now = time.perf_counter()
        if out.new_token_ids:
            if ttft is None:
                ttft = now - t0
            else:
                itl.append(now - last)
            tokens += len(out.new_token_ids)
            last = now
        if out.timing is not None and out.timing.first_token is not None:
            prefill = out.timing.first_token - out.timing.scheduled
    return {"ttft": ttft, "itl": itl, "tokens": tokens, "prefill": prefill}


async def engine_run(llm, tokenizer, prepared, concurrency: int, tag: str) -> dict:
    """The prepared requests straight into the in-process engine, `concurrency` at a time (warm-ups
    first, one at a time)."""
    ttft, itl = [], []
    tokens = 0
    queue = [p for p in prepared if p.index >= 0]
    for p in prepared:
        if p.index < 0:
            await engine_one(llm, tokenizer, p, f"{tag}-warm")
    start = time.perf_counter()

    async def client() -> None:
        nonlocal tokens
        while queue:
            out = await engine_one(llm, tokenizer, queue.pop(0), tag)
            ttft.append(out["ttft"])
            itl.extend(out["itl"])
            tokens += out["tokens"]

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


def prefill_seconds_total(metrics_url: str) -> float:
    """The worker's summed prefill time (scheduled -> first token) from its Prometheus histogram."""
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            if sample.name == "vllm:request_prefill_time_seconds_sum":
                return sample.value
    raise RuntimeError(f"no prefill histogram at {metrics_url}")


async def c1_round(llm, tokenizer, runner, prepared, metrics_url: str, tag: str) -> dict:
    """Each prompt to the engine and to the mesh, back to back; who goes first alternates."""
    for p in prepared:
        if p.index < 0:
            await engine_one(llm, tokenizer, p, f"{tag}-warm")
            await runner.send(p)
    pairs = []
    for k, p in enumerate(q for q in prepared if q.index >= 0):
        out: dict[str, dict] = {}
        for target in TARGETS if k % 2 == 0 else TARGETS[::-1]:
            if target == "engine":
                out["engine"] = await engine_one(llm, tokenizer, p, tag)
            else:
                before = await asyncio.to_thread(prefill_seconds_total, metrics_url)
                rec = await runner.send(p)
                await asyncio.sleep(0.02)  # the worker records the request as its stream ends
                after = await asyncio.to_thread(prefill_seconds_total, metrics_url)
                if rec.error is not None:
                    raise RuntimeError(f"mesh request failed: {rec.error}")
                out["mesh"] = {"ttft": rec.ttft, "itl": rec.itl, "prefill": after - before}
        pairs.append(out)
    return {t: {k: [p[t][k] for p in pairs] for k in SAMPLES} for t in TARGETS}


def c1_summary(rounds: list[dict]) -> dict:
    """Pooled percentiles over the interleaved samples, paired differences, and the TTFT split."""
    out: dict = {}
    pooled = {t: {k: [x for r in rounds for x in r[t][k]] for k in SAMPLES} for t in TARGETS}
    for t in TARGETS:
        ttft, itl, prefill = (
            pooled[t]["ttft"],
            [x for xs in pooled[t]["itl"] for x in xs],
            pooled[t]["prefill"],
        )
        out[t] = {
            "ttft_p50_ms": pct_ms(ttft, 50),
            "ttft_p90_ms": pct_ms(ttft, 90),
            "itl_p50_ms": pct_ms(itl, 50),
            "itl_p90_ms": pct_ms(itl, 90),
            "prefill_step_p50_ms": pct_ms(prefill, 50),
            "outside_prefill_p50_ms": pct_ms([a - b for a, b in zip(ttft, prefill, strict=True)], 50),
            "ttft_p50_ms_rounds": [round(pct_ms(r[t]["ttft"], 50), 2) for r in rounds],
            "samples": len(ttft),
        }
    e, m = pooled["engine"], pooled["mesh"]
    out["paired"] = {
        "ttft_diff_median_ms": pct_ms([b - a for a, b in zip(e["ttft"], m["ttft"], strict=True)], 50),
        "prefill_step_diff_median_ms": pct_ms(
            [b - a for a, b in zip(e["prefill"], m["prefill"], strict=True)], 50
        ),
    }
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"engine": "#999", "mesh": "#2a7"}
    labels = {"engine": "engine in-process", "mesh": "mesh over HTTP+NATS"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    c1 = result["c1"]
    ax = axes[0]  # c1 TTFT p50, split into the engine's prefill step and everything else
    for i, t in enumerate(TARGETS):
        step, rest = c1[t]["prefill_step_p50_ms"], c1[t]["outside_prefill_p50_ms"]
        ax.bar(i, step, 0.6, color=colors[t], label=f"{labels[t]}: prefill step")
        ax.bar(i, rest, 0.6, bottom=step, color=colors[t], alpha=0.45, hatch="//", label=f"{t}: the rest")
        ax.text(i, step + rest, f"{c1[t]['ttft_p50_ms']:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([0, 1], list(TARGETS))
    ax.set_title("concurrency 1: TTFT p50 (ms)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, t in enumerate(TARGETS):
        ax.bar(i, c1[t]["itl_p50_ms"], 0.6, color=colors[t])
        ax.text(i, c1[t]["itl_p50_ms"], f"{c1[t]['itl_p50_ms']:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([0, 1], list(TARGETS))
    ax.set_title("concurrency 1: inter-token p50 (ms)")
    ax = axes[2]
    for t in TARGETS:
        rounds = result["c8"][t]["rounds_tok_s"]
        ax.plot(range(1, len(rounds) + 1), rounds, "o-", color=colors[t], label=labels[t])
    ratio = result["overhead"]["tok_s_ratio_c8"]
    ax.set_title(f"concurrency 8: output tok/s per round (ratio {ratio:.2f})")
    ax.set_xlabel("round")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
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
    parser.add_argument("--c1-requests", type=int, default=12, help="prompts per c1 round (each to both)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating engine/mesh rounds")
    parser.add_argument("--out", type=Path, default=RESULTS / "mesh_bench.json")
    args = parser.parse_args()
    engine_allocator_env()  # the in-process engine gets the worker's allocator settings
    configure_threads(None)
    from transformers import AutoTokenizer

    from kvmesh.libs.engine.async_engine import AsyncLLM
    from kvmesh.libs.engine.config import EngineConfig
    from kvmesh.libs.engine.engine import LLMEngine
    from kvmesh.libs.engine.model_store import resolve_model
    from kvmesh.libs.launcher import Mesh, MeshConfig
    from kvmesh.loadtest.openai_load import LengthDist, LoadConfig, build_requests, open_runner, run_load

    folder = resolve_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    c1_rounds: list[dict] = []
    c8_runs: dict[str, list[dict]] = {t: [] for t in TARGETS}
    loads: list[list[float]] = []

    def config(concurrency: int, num_requests: int, seed: int, base_url: str) -> LoadConfig:
        return LoadConfig(
            base_url=base_url,
            model=folder.name,
            concurrency=concurrency,
            num_requests=num_requests,
            prompt_tokens=LengthDist(225),
            output_tokens=LengthDist(64),
            seed=seed,
            progress=False,
        )

    def note(text: str) -> None:
        loads.append([round(x, 2) for x in os.getloadavg()])
        print(f"  {text}, load {loads[-1][0]}", flush=True)

    async def bench(mesh: Mesh) -> None:
        # Both targets stay loaded for the whole run and take turns. An idle engine thread blocks on
        # its command queue and its OpenMP threads sleep: it costs the other nothing.
        llm = AsyncLLM(lambda: LLMEngine(EngineConfig(dtype="bfloat16"), load_tokenizer=False))
        await llm.ready()
        base_url = f"{mesh.base_url}/v1"
        metrics_url = mesh.metrics_urls[mesh.worker_ids[0]]
        for r in range(args.rounds):
            c1 = config(1, args.c1_requests, r, base_url)
            async with open_runner(c1) as runner:
                prepared = build_requests(c1, random.Random(r), None)
                c1_rounds.append(await c1_round(llm, tokenizer, runner, prepared, metrics_url, f"r{r}"))
            ttft = {t: pct_ms(c1_rounds[-1][t]["ttft"], 50) for t in TARGETS}
            note(
                f"round {r + 1}/{args.rounds} c1: TTFT p50 engine {ttft['engine']:.1f}, "
                f"mesh {ttft['mesh']:.1f} ms"
            )
            c8 = config(8, args.requests, r, base_url)
            for target in TARGETS if r % 2 == 0 else TARGETS[::-1]:
                if target == "engine":
                    reqs = build_requests(c8, random.Random(r), None)
                    out = await engine_run(llm, tokenizer, reqs, c8.concurrency, f"r{r}")
                else:
                    out = mesh_samples(await run_load(c8))
                c8_runs[target].append(out)
                note(f"round {r + 1}/{args.rounds} c8 {target}: {out['output_tok_s']:.1f} tok/s")
        llm.shutdown()

    print(f"the mesh (1 worker) and the engine in this process, {args.rounds} alternating rounds", flush=True)
    with Mesh(MeshConfig(num_workers=1, log_dir=RESULTS / "mesh_bench_logs")) as mesh:
        mesh.wait_ready(300)
        asyncio.run(bench(mesh))

    c1 = c1_summary(c1_rounds)
    result: dict = {"c1": c1, "c8": {t: combine(v) for t, v in c8_runs.items()}}
    ratios = [
        m["output_tok_s"] / e["output_tok_s"] for e, m in zip(c8_runs["engine"], c8_runs["mesh"], strict=True)
    ]
    result["overhead"] = {
        "ttft_p50_added_ms_c1": c1["mesh"]["ttft_p50_ms"] - c1["engine"]["ttft_p50_ms"],
        "ttft_paired_diff_median_ms_c1": c1["paired"]["ttft_diff_median_ms"],
        "outside_prefill_added_ms_c1": c1["mesh"]["outside_prefill_p50_ms"]
        - c1["engine"]["outside_prefill_p50_ms"],
        "prefill_step_paired_diff_median_ms_c1": c1["paired"]["prefill_step_diff_median_ms"],
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
