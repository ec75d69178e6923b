"""Calibrate the simulated worker's timing model from the real engine on this machine.

Runs the real engine in this process (default model, bf16, 2 threads unless told otherwise) on
steps of known shape and times each `step()`. The machine is shared (other processes steal the
cores now and then), so each measurement first waits for idle cores (bounded), every point is
measured once per pass over all of them (`--passes`), and each keeps its fastest pass (for decode:
the lower quartile of its steps, then the fastest pass): the engine's own cost, not the
neighbours'. Check `load_average_at_end` and the validation in the profile all the same.
  prefill   one fresh prompt of n tokens (n = 16 .. 512) in one step: fixed cost + cost per token;
  chunks    a 2,048-token prompt in 512-token chunks: the extra attention cost over cached context;
  decode    B requests decoding together (B = 1 .. 64, 128-token prompts): step time by batch size,
            and B = 8 over 1,536-token prompts: the extra cost per context token.
Then it replays a mixed workload (shared prefixes, prefix hits, chunked prefill, decodes of
different lengths, all arriving at once) on the real engine and on the simulated core with the
fitted profile, and records both makespans and mean TTFTs: the model's error on a workload it was
not fitted on. Writes the profile the simulated workers load by default.

    python -m kvmesh.loadtest.calibrate_sim [--threads 2] [--out services/sim_worker/default_profile.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

import msgspec

from kvmesh.libs.threads import configure_threads

BUDGET = 512


def cpu_idle(interval_s: float = 0.5) -> float:
    """Fraction of the machine's CPU time spent idle over the next `interval_s` (Linux /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(interval_s)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(min_idle: float = 0.7, max_wait_s: float = 30.0) -> None:
    """Wait (bounded) until no other process keeps the cores busy: a neighbour's burst would be
    measured as the engine's cost."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline and cpu_idle() < min_idle:
        pass


def fresh(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 40000) for _ in range(n)]


def timed_step(engine) -> float:
    t0 = time.perf_counter()
    engine.step()
    return time.perf_counter() - t0


def drain(engine) -> None:
    for rid in list(engine.requests):
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()


def prefill_once(engine, rng, n: int) -> float:
    """One step prefilling a fresh n-token prompt (nothing cached)."""
    from kvmesh.libs.engine.sampling_params import SamplingParams

    wait_quiet()
    engine.add_request(f"p{n}-{rng.random()}", fresh(rng, n), SamplingParams(max_tokens=1, ignore_eos=True))
    t = timed_step(engine)
    drain(engine)
    return t


def chunks_once(engine, rng, prompt_len: int) -> dict[int, float]:
    """Step time of each BUDGET-token chunk of a long prompt, by the context already computed."""
    from kvmesh.libs.engine.sampling_params import SamplingParams

    wait_quiet()
    engine.add_request(
        f"c{rng.random()}", fresh(rng, prompt_len), SamplingParams(max_tokens=1, ignore_eos=True)
    )
    by_ctx, ctx = {}, 0
    while engine.has_unfinished_requests():
        by_ctx[ctx] = timed_step(engine)
        ctx += BUDGET
    return {c: t for c, t in by_ctx.items() if c < prompt_len}


def measure_decode(engine, rng, batch: int, prompt_len: int, steps: int) -> tuple[float, float]:
    """(lower-quartile decode-step time, mean context during the timed steps) for `batch` requests."""
    from kvmesh.libs.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 64, ignore_eos=True, temperature=0)
    reqs = [
        engine.add_request(f"d{batch}-{prompt_len}-{i}", fresh(rng, prompt_len), params) for i in range(batch)
    ]
    while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in reqs):
        engine.step()
    wait_quiet()
    ctx = statistics.mean(r.num_tokens for r in reqs) + steps / 2
    times = sorted(timed_step(engine) for _ in range(steps))
    drain(engine)
    return times[len(times) // 4], ctx


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def mixed_workload(rng: random.Random) -> list[tuple[str, list[int], int]]:
    """4 groups sharing 384-token prefixes, 6 requests each with 48 own tokens, 8-48 output tokens."""
    work = []
    for g in range(4):
        prefix = fresh(rng, 384)
        for u in range(6):
            work.append((f"v{g}-{u}", prefix + fresh(rng, 48), rng.randint(8, 48)))
    rng.shuffle(work)
    return work


def replay_real(engine, work) -> tuple[float, float]:
    """(makespan, mean TTFT) of the workload on the real engine, all requests arriving at once."""
    from kvmesh.libs.engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    first: dict[str, float] = {}
    for rid, prompt, n in work:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.new_token_ids:
                first.setdefault(out.request_id, time.perf_counter() - t0)
    return time.perf_counter() - t0, statistics.mean(first.values())


def replay_sim(profile, work, num_blocks: int) -> tuple[float, float]:
    from kvmesh.libs.engine.sampling_params import SamplingParams
    from kvmesh.services.sim_worker.core import SimCore, SimEngineConfig

    core = SimCore(SimEngineConfig(num_kv_blocks=num_blocks, max_num_batched_tokens=BUDGET), profile)
    for rid, prompt, n in work:
        core.add_request(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0))
    clock = 0.0
    first: dict[str, float] = {}
    while core.has_unfinished_requests():
        step = core.step()
        clock += step.duration_s
        for out in step.outputs:
            if out.new_token_ids:
                first.setdefault(out.request_id, clock)
    return clock, statistics.mean(first.values())


def validate(engine, profile, num_blocks: int, runs: int) -> dict:
    """Replay the mixed workload on the real engine and the simulated core; the least disturbed
    real run (shortest makespan) against its simulation."""
    print("validation: a mixed workload on the real engine and on the simulated core", flush=True)
    results = []
    for seed in range(1, runs + 1):  # different tokens each time: no run hits another's cache
        work = mixed_workload(random.Random(seed))
        wait_quiet()
        results.append((*replay_real(engine, work), *replay_sim(profile, work, num_blocks)))
        print(f"  real makespan {results[-1][0]:.2f} s, simulated {results[-1][2]:.2f} s", flush=True)
    real_span, real_ttft, sim_span, sim_ttft = min(results)
    return {
        "workload": "24 requests at once: 4 groups x 6, 384-token shared prefix + 48 own tokens, 8-48 output",
        "real_makespan_s": round(real_span, 4),
        "sim_makespan_s": round(sim_span, 4),
        "makespan_error": round(sim_span / real_span - 1, 4),
        "real_mean_ttft_s": round(real_ttft, 4),
        "sim_mean_ttft_s": round(sim_ttft, 4),
        "mean_ttft_error": round(sim_ttft / real_ttft - 1, 4),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--passes", type=int, default=4, help="measurements of every point, min kept")
    parser.add_argument("--decode-steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None, help="default: the sim worker's default profile")
    parser.add_argument("--validation-runs", type=int, default=3)
    parser.add_argument(
        "--validate-only", action="store_true", help="only re-run the validation of the profile at --out"
    )
    args = parser.parse_args()
    configure_threads(args.threads)
    from kvmesh.libs.engine.config import EngineConfig
    from kvmesh.libs.engine.engine import LLMEngine
    from kvmesh.services.sim_worker.timing import DEFAULT_PROFILE, TimingProfile

    out_path = args.out or DEFAULT_PROFILE
    rng = random.Random(0)
    cfg = EngineConfig(model=args.model, dtype=args.dtype, max_num_batched_tokens=BUDGET, num_kv_blocks=4096)
    engine = LLMEngine(cfg, load_tokenizer=False)
    if args.validate_only:
        from kvmesh.services.sim_worker.timing import load_profile

        profile = load_profile(out_path)
        prefill_once(engine, rng, BUDGET)  # warm up
        meta = {
            **profile.meta,
            "validation": validate(engine, profile, cfg.num_kv_blocks, args.validation_runs),
        }
        out_path.write_bytes(msgspec.structs.replace(profile, meta=meta).to_json() + b"\n")
        print(f"validation: {meta['validation']}\nwrote {out_path}")
        return
    print("warming up", flush=True)
    prefill_once(engine, rng, BUDGET)
    measure_decode(engine, rng, 4, 64, 4)

    # Passes over every point, each point's repeats spread over the whole run: a neighbour's burst
    # spoils one pass of a point, not all of them.
    sizes, batches = [16, 64, 128, 256, 384, 512], [1, 2, 4, 8, 16, 32, 64]
    prefill_t: dict[int, list[float]] = {n: [] for n in sizes}
    chunk_t: dict[int, list[float]] = {}
    decode_runs: dict[int, list[tuple[float, float]]] = {b: [] for b in batches}
    long_runs: list[tuple[float, float]] = []
    for p in range(args.passes):
        for n in sizes:
            prefill_t[n].append(prefill_once(engine, rng, n))
        for c, t in chunks_once(engine, rng, 2048).items():
            chunk_t.setdefault(c, []).append(t)
        for b in batches:
            decode_runs[b].append(measure_decode(engine, rng, b, 128, args.decode_steps))
        long_runs.append(measure_decode(engine, rng, 8, 1536, args.decode_steps))
        print(
            f"pass {p + 1}/{args.passes}: prefill "
            + " ".join(f"{n}:{prefill_t[n][-1] * 1e3:.0f}" for n in sizes)
            + " ms; chunks "
            + " ".join(f"@{c}:{t[-1] * 1e3:.0f}" for c, t in chunk_t.items())
            + " ms; decode "
            + " ".join(f"b{b}:{decode_runs[b][-1][0] * 1e3:.1f}" for b in batches)
            + f" ms, b8@1.5k:{long_runs[-1][0] * 1e3:.1f} ms",
            flush=True,
        )
    prefill = {n: min(t) for n, t in prefill_t.items()}
    base, per_token = linear_fit(sizes, [prefill[n] for n in sizes])
    chunks = {c: min(t) for c, t in chunk_t.items()}
    flat = base + per_token * BUDGET
    # extra(ctx) = k * BUDGET * ctx, least squares through the origin
    num = sum((t - flat) * BUDGET * c for c, t in chunks.items() if c)
    den = sum((BUDGET * c) ** 2 for c in chunks if c)
    per_token_ctx = max(0.0, num / den) if den else 0.0
    decode, ctxs = {}, []
    for b in batches:
        decode[b], ctx = min(decode_runs[b])
        decode[b] = max(decode[b], *(decode[a] for a in batches if a < b))  # a bigger batch never costs less
        ctxs.append(ctx)
    ref_ctx = round(statistics.mean(ctxs))
    long_t, long_ctx = min(long_runs)
    per_ctx = max(0.0, (long_t - decode[8]) / (8 * (long_ctx - ctxs[batches.index(8)])))

    profile = TimingProfile(
        prefill_base_s=max(base, 0.0),
        prefill_s_per_token=per_token,
        prefill_s_per_token_ctx=per_token_ctx,
        decode_batch_sizes=batches,
        decode_step_s=[decode[b] for b in batches],
        decode_ref_context=ref_ctx,
        decode_s_per_ctx_token=per_ctx,
        meta={},
    )
    validation = validate(engine, profile, cfg.num_kv_blocks, args.validation_runs)
    meta = {
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "block_size": cfg.block_size,
        "max_num_batched_tokens": BUDGET,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "raw_prefill_s": {str(n): round(t, 6) for n, t in prefill.items()},
        "raw_chunk_s_by_context": {str(c): round(t, 6) for c, t in chunks.items()},
        "raw_decode_long_context": {"batch": 8, "context": round(long_ctx), "step_s": round(long_t, 6)},
        "validation": validation,
    }
    profile = msgspec.structs.replace(profile, meta=meta)
    out_path.write_bytes(profile.to_json() + b"\n")
    print(
        f"prefill: {base * 1e3:.2f} ms + {per_token * 1e6:.1f} us/token "
        f"(+{per_token_ctx * 1e9:.2f} ns per token x context); "
        f"decode: {decode[1] * 1e3:.1f} ms at batch 1 .. {decode[64] * 1e3:.1f} ms at 64 "
        f"(+{per_ctx * 1e6:.2f} us per context token)"
    )
    print(f"validation: {validation}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
