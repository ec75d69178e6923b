"""Engine memory under varied batches, in minutes and without a mesh: the engine in-process (bf16, 1
thread, 16 sequences at most, like a soak worker) over random prompt lengths (24-300 tokens, one in
ten 400-1,000, three in ten behind one of four shared prefixes) and output lengths (8-64), with the
number of requests in flight redrawn every 5-40 steps; RSS sampled every few seconds and judged like
loadtest/soak.py judges a worker (flat: the last quarter's median at most max(8 MiB, 1 %) above the
third quarter's, after the warm-up).

It runs the engine as the worker does: steps padded to few shapes (libs/engine/step_shapes.py) and
oneDNN's / ideep's shape caches bounded (libs/allocator_env.py, unless the environment sets them).
`--buckets none --library-cache-sizes --no-cpu-kernel` runs it as it was before either (and before
decode attention moved to the C++ kernel, which creates no oneDNN primitives). Besides RSS it counts the
distinct shapes the model met (token rows, decode batch x context, lm-head rows, prefill chunks) and
the extra work the padding cost (rows through the linears, decode attention area).

    python -m kvmesh.loadtest.memory_soak --duration 240                  # -> results/memory_soak.json
    python -m kvmesh.loadtest.memory_soak --duration 240 --buckets none --library-cache-sizes \
        --no-cpu-kernel --out loadtest/results/memory_soak_before.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from kvmesh.libs.allocator_env import engine_allocator_env
from kvmesh.libs.threads import configure_threads

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class ShapeLog:
    """Distinct values of each step dimension, as the model saw them (after any bucketing)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.seen: dict[str, set] = {
            k: set()
            for k in ("tokens", "decode_batch", "decode_batch_x_context", "logit_rows", "prefill_chunk")
        }
        # the padding's cost: rows through the linears, and decode attention area (sequences x context),
        # as computed vs as the step itself needed
        self.work = {"token_rows": [0, 0], "decode_attention_area": [0, 0]}

    def record(self, input_ids, meta, logit_rows) -> None:
        s = self.seen
        s["tokens"].add(int(input_ids.shape[0]))
        s["logit_rows"].add(len(logit_rows))
        self.work["token_rows"][0] += int(input_ids.shape[0])
        self.work["token_rows"][1] += meta.num_tokens
        if meta.decode_bias is not None:
            seqs, ctx = int(meta.decode_bias.shape[1]), int(meta.decode_bias.shape[3])
            s["decode_batch"].add(seqs)
            s["decode_batch_x_context"].add((seqs, ctx))
            table = meta.decode_block_tables
            self.work["decode_attention_area"][0] += seqs * ctx
            self.work["decode_attention_area"][1] += table.shape[0] * table.shape[1] * self.block_size
        for c in meta.prefills:
            s["prefill_chunk"].add((c.length, c.context_len))

    def padding(self) -> dict[str, float]:
        """Extra work the padding adds, as a share of the step's own."""
        return {k: round(done / need - 1, 4) if need else 0.0 for k, (done, need) in self.work.items()}

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.seen.items()}


def run(args: argparse.Namespace) -> dict:
    import torch

    from kvmesh.libs.engine.config import EngineConfig
    from kvmesh.libs.engine.engine import LLMEngine
    from kvmesh.libs.engine.sampling_params import SamplingParams
    from kvmesh.libs.engine.step_shapes import StepBuckets
    from kvmesh.loadtest.soak import RssSampler

    rng = random.Random(args.seed)
    engine = LLMEngine(
        EngineConfig(
            dtype=args.dtype,
            max_num_seqs=args.max_num_seqs,
            kv_cache_memory_gb=0.25,
            bucket_step_shapes=args.buckets != ["none"],
            cpu_attention_kernel=not args.no_cpu_kernel,
        ),
        load_tokenizer=False,
    )
    if args.buckets not in (["default"], ["none"]):
        engine.runner.buckets = StepBuckets(*(None if b == "none" else int(b) for b in args.buckets))
    shapes = ShapeLog(engine.config.block_size)
    build = engine.runner.build

    def recording_build(out):
        built = build(out)
        shapes.record(built[0], built[2], built[3])
        return built

    engine.runner.build = recording_build
    vocab = engine.model.cfg.vocab_size
    prefixes = [[rng.randrange(vocab) for _ in range(rng.randint(32, 200))] for _ in range(4)]

    def prompt() -> list[int]:
        n = rng.randint(*args.prompt_tokens) if rng.random() > 0.1 else rng.randint(400, 1000)
        head = rng.choice(prefixes) if rng.random() < 0.3 else []  # prefix-cache hits
        return head + [rng.randrange(vocab) for _ in range(n)]

    series: list[tuple[float, float]] = []
    shape_series: list[tuple[float, dict]] = []
    t0 = time.monotonic()
    cpu0 = time.process_time()
    next_sample = t0
    next_mix = 0
    target = 1
    submitted = finished = steps = out_tokens = 0
    while (now := time.monotonic()) < t0 + args.duration and steps < args.max_steps:
        if steps >= next_mix:  # by steps, not time: the same seed gives the same steps on any machine
            target = rng.randint(1, args.max_concurrency)
            next_mix = steps + rng.randint(5, 40)
        while len(engine.requests) < target:
            params = SamplingParams(
                max_tokens=rng.randint(*args.output_tokens), temperature=0, ignore_eos=True
            )
            engine.add_request(f"r{submitted}", prompt(), params)
            submitted += 1
        for o in engine.step():
            out_tokens += len(o.new_token_ids)
            finished += o.finished
        steps += 1
        if now >= next_sample:
            t = round(now - t0, 1)
            series.append((t, rss_mib()))
            shape_series.append((t, shapes.counts()))
            next_sample = now + args.sample_every
    cpu_s = time.process_time() - cpu0
    series.append((round(time.monotonic() - t0, 1), rss_mib()))
    shape_series.append((series[-1][0], shapes.counts()))

    sampler = RssSampler(None, 0)
    sampler.series = {"engine": [(t, int(m * 2**20)) for t, m in series]}
    memory = sampler.report(args.warmup)["engine"]
    cache_env = {k: os.environ.get(k) for k in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "cache_env": cache_env,
        "load_avg_start_end": [args.load_start, list(os.getloadavg())],
        "steps": steps,
        "requests_finished": finished,
        "output_tokens": out_tokens,
        "cpu_ms_per_step": round(cpu_s / steps * 1e3, 2),  # this process's CPU time: robust to neighbours
        "cpu_ms_per_output_token": round(cpu_s / out_tokens * 1e3, 3),
        "buckets": repr(engine.runner.buckets),
        # the C++ kernel creates no oneDNN primitives: decode shapes are then neither bucketed nor logged
        "decode_attention": "cpu kernel" if engine.runner.decode_kernel else "torch (gather + matmuls)",
        "distinct_shapes": shapes.counts(),
        "padding_extra_work": shapes.padding(),
        "memory": memory,
        "rss_growth_after_warmup_mib": round(
            series[-1][1] - next(m for t, m in series if t >= args.warmup), 1
        ),
        "shape_series": shape_series,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=180.0)
    p.add_argument("--max-steps", type=int, default=10**9, help="stop after this many steps (for A/B runs)")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds before the memory is judged")
    p.add_argument("--sample-every", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=24,
        help="requests in the engine at most (the target is redrawn every 5-40 steps)",
    )
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=(24, 300))
    p.add_argument("--output-tokens", type=int, nargs=2, default=(8, 64))
    p.add_argument(
        "--buckets",
        nargs="+",
        default=["default"],
        help="step-shape buckets: default, none (exact shapes), or 4 StepBuckets bits (tokens, logit "
        "rows, decode seqs, decode blocks; 'none' for exact)",
    )
    p.add_argument(
        "--library-cache-sizes",
        action="store_true",
        help="leave oneDNN's and ideep's shape caches at the libraries' sizes (the worker bounds them)",
    )
    p.add_argument(
        "--no-cpu-kernel", action="store_true", help="decode attention on the torch path (gather + matmuls)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "memory_soak.json")
    args = p.parse_args(argv)
    args.load_start = list(os.getloadavg())
    if not args.library_cache_sizes:
        engine_allocator_env()  # as the worker does, before torch loads
    configure_threads(args.threads)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    m = result["memory"]
    print(
        f"memory_soak: {result['steps']} steps, {result['requests_finished']} requests; RSS "
        f"{m['start_mib']} -> {m['end_mib']} MiB after warm-up (slope {m['slope_mib_per_min']} MiB/min, "
        f"late growth {m['late_growth_mib']}), flat={m['flat']}; shapes {result['distinct_shapes']}; "
        f"padding {result['padding_extra_work']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
