"""Decode attention per layer: the engine's torch path (gather the blocks, then matmuls) against the
C++ CPU kernel (kernels/paged_attention_cpu.py), on SmolLM2's shapes in the engine's cache layout.

Both run in turns on the same tensors (best of several timed loops each), for 1 and 2 threads:
background load on the machine falls on both alike. The load average is recorded.

    python -m kvmesh.loadtest.attention_bench   -> loadtest/results/attention_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(1, 300), (8, 300), (8, 1000), (32, 600)]  # (decode sequences, context tokens)
NUM_BLOCKS, KV_HEADS, BLOCK, HEAD_DIM, HEADS = 4096, 3, 16, 64, 9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "attention_bench.json")
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args()
    from kvmesh.libs.threads import configure_threads

    configure_threads(None)
    import torch

    from kvmesh.kernels.paged_attention_cpu import paged_attention_cpu
    from kvmesh.libs.engine.attention import gather_blocks

    cache = torch.randn(NUM_BLOCKS, 2, 2, KV_HEADS, BLOCK, HEAD_DIM).to(torch.bfloat16)
    kc, vc = cache[:, 1, 0], cache[:, 1, 1]  # one layer's views, as the engine passes them
    scale = HEAD_DIM**-0.5
    group = HEADS // KV_HEADS

    def torch_path(q, table, bias):
        nd = q.shape[0]
        qd = q.view(nd, KV_HEADS, group, HEAD_DIM).transpose(0, 1)
        kd, vd = gather_blocks(kc, table), gather_blocks(vc, table)
        scores = torch.add(bias, torch.matmul(qd, kd.transpose(-1, -2)), alpha=scale)
        probs = torch.softmax(scores, -1).to(q.dtype)
        return torch.matmul(probs, vd).transpose(0, 1).reshape(nd, HEADS, HEAD_DIM)

    def best_us(fn) -> float:
        for _ in range(3):
            fn()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(args.iters):
                fn()
            best = min(best, (time.perf_counter() - t) / args.iters * 1e6)
        return best

    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for nd, ctx in SHAPES:
            nblk = -(-ctx // BLOCK)
            table = torch.randperm(NUM_BLOCKS)[: nd * nblk].view(nd, nblk)
            q = torch.randn(nd, HEADS, HEAD_DIM).to(torch.bfloat16)
            bias = torch.zeros(1, nd, 1, nblk * BLOCK)
            bias[..., ctx:] = float("-inf")
            args_cpp = (
                q, kc.transpose(1, 2), vc.transpose(1, 2), table.to(torch.int32),
                torch.arange(nd + 1, dtype=torch.int32), torch.full((nd,), ctx, dtype=torch.int32), scale,
            )  # fmt: skip
            err = (torch_path(q, table, bias).float() - paged_attention_cpu(*args_cpp).float()).abs().max()
            t_torch = best_us(lambda q=q, table=table, bias=bias: torch_path(q, table, bias))
            t_cpp = best_us(lambda a=args_cpp: paged_attention_cpu(*a))
            row = {
                "threads": threads,
                "decode_seqs": nd,
                "context": ctx,
                "torch_us": round(t_torch, 1),
                "kernel_us": round(t_cpp, 1),
                "speedup": round(t_torch / t_cpp, 2),
                "max_abs_diff": round(float(err), 4),
                "load_average": round(os.getloadavg()[0], 2),
            }
            rows.append(row)
            print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"per_layer_bf16": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
