"""What step-shape bucketing costs: one engine, its model runner exact and bucketed in turns on the
same workloads, several rounds (the first variant of a round goes last in the next), throughput in
output tokens per second of this process's CPU time (neighbours' load on a shared machine changes
wall time far more than CPU time), plus the padding's extra work.

Workloads (bf16, random token prompts, ignore_eos):
  batch32   32 requests at once, 256-token prompts, 16-128 output tokens, 64 sequences at most
  conc8     16 requests at closed-loop concurrency 8, 256-token prompts, 64 output tokens
  mixed16   40 requests at once, 24-300-token prompts, 8-64 output tokens, 16 sequences at most

    python -m kvmesh.loadtest.step_shapes_bench [--rounds 3]   -> loadtest/results/step_shapes_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from kvmesh.libs.threads import configure_threads

RESULTS = Path(__file__).resolve().parent / "results"


def workloads(vocab: int, seed: int) -> dict[str, dict]:
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(1000, vocab) for _ in range(n)]

    return {
        "batch32": {"reqs": [(ids(256), rng.randint(16, 128)) for _ in range(32)], "seqs": 64, "conc": 0},
        "conc8": {"reqs": [(ids(256), 64) for _ in range(16)], "seqs": 64, "conc": 8},
        "mixed16": {
            "reqs": [(ids(rng.randint(24, 300)), rng.randint(8, 64)) for _ in range(40)],
            "seqs": 16,
            "conc": 0,
        },
    }


def run(engine, work: dict, tag: str) -> float:
    """Output tokens per CPU second for one pass over a workload."""
    from kvmesh.libs.engine.sampling_params import SamplingParams

    engine.scheduler.max_num_seqs = work["seqs"]
    engine.pool.reset_prefix_cache()
    pending = list(enumerate(work["reqs"]))
    conc = work["conc"] or len(pending)

    def submit() -> None:
        i, (prompt, n) = pending.pop(0)
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

    while pending and len(engine.requests) < conc:
        submit()
    tokens, cpu0 = 0, time.process_time()
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.finished and pending:
                submit()
    return tokens / (time.process_time() - cpu0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--variants",
        default="exact,bucketed",
        help="runners to time (one alone: e.g. bucketed under different cache sizes, one run each)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "step_shapes_bench.json")
    args = p.parse_args(argv)
    load_start = list(os.getloadavg())
    configure_threads(args.threads)
    from kvmesh.libs.engine.config import EngineConfig
    from kvmesh.libs.engine.engine import LLMEngine
    from kvmesh.libs.engine.model_runner import ModelRunner
    from kvmesh.libs.engine.step_shapes import StepBuckets
    from kvmesh.loadtest.memory_soak import ShapeLog

    engine = LLMEngine(EngineConfig(max_num_seqs=64, kv_cache_memory_gb=0.5), load_tokenizer=False)
    bs = engine.config.block_size
    buckets = {"exact": StepBuckets.exact(), "bucketed": StepBuckets()}
    variants = args.variants.split(",")
    runners = {v: ModelRunner(engine.model, engine.kv_cache, bs, buckets[v]) for v in variants}
    work = workloads(engine.model.cfg.vocab_size, args.seed)
    padding: dict[str, dict] = {}
    for name, w in work.items():  # warm every variant's shapes; log their padding
        for variant, runner in runners.items():
            shapes = ShapeLog(bs)
            build = runner.build

            def logged(out, build=build, shapes=shapes):
                built = build(out)
                shapes.record(built[0], built[2], built[3])
                return built

            runner.build = logged
            engine.runner = runner
            run(engine, w, f"warm-{variant}-{name}")
            runner.build = build
            padding.setdefault(name, {})[variant] = {
                "extra_work": shapes.padding(),
                "distinct_shapes": shapes.counts(),
            }
    rounds: dict[str, dict[str, list[float]]] = {w: {n: [] for n in runners} for w in work}
    order = list(runners)
    for r in range(args.rounds):
        for name, w in work.items():
            for variant in order[r % len(order) :] + order[: r % len(order)]:
                engine.runner = runners[variant]
                rounds[name][variant].append(round(run(engine, w, f"{variant}-{name}-{r}"), 2))
        print(f"round {r + 1}/{args.rounds}: {json.dumps(rounds)}", flush=True)
    summary = {}
    for name, per in rounds.items():
        summary[name] = {f"{v}_tok_per_cpu_s": statistics.median(x) for v, x in per.items()}
        if len(per) == 2:
            summary[name]["bucketed_vs_exact"] = round(
                statistics.median(per["bucketed"]) / statistics.median(per["exact"]) - 1, 4
            )
        summary[name]["padding"] = padding[name]
    result = {
        "threads": args.threads,
        "cache_env": {
            k: os.environ.get(k) for k in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
        },
        "buckets": {v: repr(r.buckets) for v, r in runners.items()},
        "load_avg_start_end": [load_start, list(os.getloadavg())],
        "summary": summary,
        "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, s in summary.items():
        print(f"{name}: {json.dumps(s)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
