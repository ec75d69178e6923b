"""What disaggregation predicts at scale: a discrete-event simulation over simulated worker cores.

Each worker is a `SimCore` (services/sim_worker/core.py): the real block pool, prefix cache and
scheduler with the forward replaced by the calibrated step-time model, run here on a virtual clock,
so hundreds of workers simulate in seconds. A transfer costs its bytes over the NIXL bandwidth
measured by disagg_bench.py (or --gb-s). Every worker stands for one machine like the calibration's.

Workload per cluster size W: long-prompt requests (~2,000 tokens in, 8 out) and chats (~64 in, 64
out), Poisson, both rates proportional to W. Setups with W workers in all:
  aggregated      W workers doing prefill and decode; least outstanding tokens.
  disaggregated   W/4 prefill + 3W/4 decode workers (--prefill-fraction); long prompts prefill
                  remotely (the router's rule: uncached >= 512 tokens and a prefill worker below
                  its queue limit), then
                  their blocks are pulled into the decode worker's prefix cache; chats stay local.

    python -m kvmesh.loadtest.disagg_sim [--sizes 2 16 64] -> loadtest/results/disagg_sim.json (+ .png)
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.libs.engine.block_hash import hash_blocks
from kvmesh.libs.engine.sampling_params import SamplingParams
from kvmesh.loadtest.load_report import pct_ms
from kvmesh.services.sim_worker.core import SimCore, SimEngineConfig
from kvmesh.services.sim_worker.timing import load_profile

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 16
BLOCK_BYTES = 368_640  # SmolLM2-135M, bf16: 30 layers x K,V x 3 heads x 16 tokens x 64 dims x 2 bytes
MIN_REMOTE_TOKENS = 512
MAX_PREFILL_QUEUE_TOKENS = 16384


@dataclass(slots=True)
class Req:
    rid: str
    kind: str  # long | chat
    tokens: list[int]
    max_tokens: int
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    itl: list[float] = field(default_factory=list)
    done: float | None = None


@dataclass(slots=True)
class Worker:
    name: str
    role: str  # aggregated | prefill | decode
    core: SimCore
    busy_until: float | None = None  # a step is running until then
    planned: object = None
    waiting_import: int = 0

    def load(self) -> int:
        return self.core.stats().outstanding_tokens


class Cluster:
    def __init__(self, roles: list[str], profile, gb_s: float, num_blocks: int) -> None:
        config = SimEngineConfig(num_kv_blocks=num_blocks)
        self.workers = [Worker(f"{r}-{i}", r, SimCore(config, profile)) for i, r in enumerate(roles)]
        self.gb_s = gb_s
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = itertools.count()
        self.reqs: dict[str, Req] = {}
        self.remote: dict[str, Worker] = {}  # prefill request id -> the decode worker waiting for it
        self.num_remote = self.num_local = 0

    def at(self, t: float, kind: str, payload: object) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def submit(self, now: float, req: Req) -> None:
        self.reqs[req.rid] = req
        serving = [w for w in self.workers if w.role != "prefill"]
        decode = min(serving, key=Worker.load)
        pool = [w for w in self.workers if w.role == "prefill" and w.load() < MAX_PREFILL_QUEUE_TOKENS]
        if pool and len(req.tokens) >= MIN_REMOTE_TOKENS:
            prefill = min(pool, key=Worker.load)
            n = (len(req.tokens) - 1) // BLOCK * BLOCK
            prefill.core.add_request(
                f"p:{req.rid}", req.tokens[:n], SamplingParams(max_tokens=1, temperature=0)
            )
            self.remote[f"p:{req.rid}"] = decode
            self.num_remote += 1
            self.kick(now, prefill)
        else:
            self.num_local += 1
            self._add(now, decode, req)

    def _add(self, now: float, worker: Worker, req: Req) -> None:
        params = SamplingParams(max_tokens=req.max_tokens, temperature=0, ignore_eos=True)
        worker.core.add_request(req.rid, req.tokens, params)
        self.kick(now, worker)

    def kick(self, now: float, w: Worker) -> None:
        if w.busy_until is None and w.core.has_unfinished_requests():
            planned = w.core.plan()
            w.planned = planned
            w.busy_until = now + planned.duration_s
            self.at(w.busy_until, "step", w)

    def step_done(self, now: float, w: Worker) -> None:
        outputs = w.core.apply(w.planned)
        w.busy_until = None
        for out in outputs:
            if out.request_id.startswith("p:"):
                if out.finished:  # prompt blocks computed: pull them into the decode worker
                    decode = self.remote.pop(out.request_id)
                    n_blocks = out.num_prompt_tokens // BLOCK
                    self.at(
                        now + n_blocks * BLOCK_BYTES / (self.gb_s * 1e9),
                        "import",
                        (decode, out.request_id[2:]),
                    )
                continue
            req = self.reqs[out.request_id]
            if out.new_token_ids:
                if req.first_token is None:
                    req.first_token = now
                else:
                    req.itl.append(now - req.last_token)
                req.last_token = now
            if out.finished:
                req.done = now
        self.kick(now, w)

    def import_blocks(self, now: float, decode: Worker, rid: str) -> None:
        """The pulled blocks land in the decode worker's prefix cache (TransferBlocks.commit)."""
        req = self.reqs[rid]
        core = decode.core
        n = (len(req.tokens) - 1) // BLOCK
        hashes = hash_blocks(req.tokens[: n * BLOCK], BLOCK, core.extra_keys, core.hash_seed)
        missing = [i for i, h in enumerate(hashes) if core.pool.lookup(h) is None]
        if missing and len(missing) <= core.pool.num_free_blocks:
            first = missing[0]
            blocks = core.pool.get_new_blocks(n - first)
            parent = hashes[first - 1] if first else None
            core.pool.cache_full_blocks(blocks, hashes[first:], parent, req.tokens[first * BLOCK : n * BLOCK])
            core.pool.free_blocks(blocks[::-1])
        self._add(now, decode, req)

    def run(self, arrivals: list[Req]) -> None:
        for r in arrivals:
            self.at(r.arrival, "arrive", r)
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                self.submit(now, payload)
            elif kind == "step":
                self.step_done(now, payload)
            else:
                self.import_blocks(now, *payload)


def workload(num_workers: int, seconds: float, long_rate: float, chat_rate: float, seed: int) -> list[Req]:
    rng = random.Random(seed)
    reqs = []
    for kind, rate, n_in, n_out in (("long", long_rate, 2000, 8), ("chat", chat_rate, 64, 64)):
        t = 0.0
        while True:
            t += rng.expovariate(rate * num_workers)
            if t > seconds:
                break
            n = max(16, int(rng.uniform(0.9, 1.1) * n_in))
            tokens = [rng.randrange(256, 49152) for _ in range(n)]
            reqs.append(Req(f"{kind}-{len(reqs)}", kind, tokens, n_out, t))
    return sorted(reqs, key=lambda r: r.arrival)


def summarize(reqs: list[Req], seconds: float) -> dict:
    out = {}
    for kind in ("long", "chat"):
        rs = [r for r in reqs if r.kind == kind and r.done is not None]
        ttft = [r.first_token - r.arrival for r in rs]
        itl = [g for r in rs for g in r.itl]
        out[kind] = {
            "requests": len(rs),
            "ttft_p50_ms": pct_ms(ttft, 50),
            "ttft_p90_ms": pct_ms(ttft, 90),
            "itl_p50_ms": pct_ms(itl, 50),
            "itl_p90_ms": pct_ms(itl, 90),
            "itl_p99_ms": pct_ms(itl, 99),
        }
    tokens = sum(len(r.itl) + 1 for r in reqs if r.done is not None)
    out["output_tok_s"] = tokens / seconds
    return out


def simulate(size: int, args, profile) -> dict:
    result = {}
    num_prefill = min(size - 1, max(1, round(size * args.prefill_fraction)))
    setups = {
        "aggregated": ["aggregated"] * size,
        "disaggregated": ["prefill"] * num_prefill + ["decode"] * (size - num_prefill),
    }
    for name, roles in setups.items():
        reqs = workload(size, args.seconds, args.long_rate, args.chat_rate, args.seed)
        cluster = Cluster(roles, profile, args.gb_s, args.num_blocks)
        cluster.run(reqs)
        result[name] = summarize(reqs, args.seconds) | {
            "remote_prefills": cluster.num_remote,
            "local_prefills": cluster.num_local,
            "prefill_workers": roles.count("prefill"),
        }
    return result


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(result["sizes"], key=int)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (kind, metric) in zip(
        axes, (("chat", "itl_p99_ms"), ("chat", "ttft_p90_ms"), ("long", "ttft_p90_ms")), strict=True
    ):
        for setup in ("aggregated", "disaggregated"):
            ax.plot(sizes, [result["sizes"][s][setup][kind][metric] for s in sizes], marker="o", label=setup)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers")
        ax.set_ylabel("ms")
        ax.set_title(f"{kind}: {metric}")
        ax.legend()
    fig.suptitle("simulated cluster (calibrated step times, NIXL pull at measured GB/s)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 16, 64])
    parser.add_argument("--seconds", type=float, default=120.0, help="virtual seconds of arrivals")
    parser.add_argument("--long-rate", type=float, default=0.04, help="long requests/s per worker")
    parser.add_argument("--chat-rate", type=float, default=0.5, help="chats/s per worker")
    parser.add_argument("--prefill-fraction", type=float, default=0.25, help="share of prefill workers")
    parser.add_argument("--num-blocks", type=int, default=2048, help="KV blocks per simulated worker")
    parser.add_argument("--gb-s", type=float, default=None, help="NIXL pull bandwidth (default: measured)")
    parser.add_argument("--profile", type=Path, default=None, help="timing profile (default: committed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "disagg_sim.json")
    args = parser.parse_args()
    if args.gb_s is None:
        measured = RESULTS / "disagg_bench.json"
        rows = json.loads(measured.read_text())["transfer"]["rows"] if measured.is_file() else []
        args.gb_s = next((r["nixl_gb_s"] for r in rows if r["blocks"] == 128), 4.0)
    profile = load_profile(args.profile)
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    result["sizes"] = {}
    for size in args.sizes:
        print(f"[{size} workers] simulating {args.seconds:.0f} s of traffic", flush=True)
        result["sizes"][str(size)] = r = simulate(size, args, profile)
        for setup in ("aggregated", "disaggregated"):
            c, lg = r[setup]["chat"], r[setup]["long"]
            print(
                f"  {setup:>13}: chat ITL p50/p99 {c['itl_p50_ms']:.0f}/{c['itl_p99_ms']:.0f} ms, "
                f"chat TTFT p90 {c['ttft_p90_ms']:.0f} ms, long TTFT p50/p90 "
                f"{lg['ttft_p50_ms']:.0f}/{lg['ttft_p90_ms']:.0f} ms",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
