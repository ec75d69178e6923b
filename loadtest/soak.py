"""Soak under overload: the whole mesh at ~2x its measured capacity for minutes, with clients that
walk away mid-request and one worker SIGKILLed and restarted on the way. What must hold:

- nothing lost: every request ends with a full answer (ignore_eos, so exactly max_tokens tokens and a
  `length` finish), a 429/503, or its own client's disconnect;
- memory flat: the RSS of every process, sampled every few seconds, no longer climbs by the end
  (caches may warm up first; see RssSampler.report);
- all KV blocks returned: once the load stops, every worker is idle with every block free and its
  block pool's integrity check passing.

Phases: calibrate (closed loop, enough clients to saturate the workers) -> overload (Poisson arrivals
at `--overload` x the calibrated requests/s; a quarter of the way in SIGKILL worker-1, restart it 15 s
later under the same id) -> drain and check. Result: loadtest/results/soak.json.

    python -m kvmesh.loadtest.soak                     # 40 s calibration + 300 s at 2x -> soak.json
    python -m kvmesh.loadtest.soak --engine-cache-capacity 1024 \
        --out loadtest/results/soak_default_caches.json   # the libraries' cache sizes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

from kvmesh.libs.threads import configure_threads
from kvmesh.loadtest.soak_report import Record, RssSampler, summarize, worker_stats
from kvmesh.loadtest.workloads import WORDS

RESULTS = Path(__file__).resolve().parent / "results"
VICTIM = "worker-1"
CLIENT_GIVES_UP_S = 600.0  # a request still unanswered by then counts as lost


@dataclass
class SoakConfig:
    duration_s: float = 300.0  # the overload phase
    calibrate_s: float = 40.0
    calibrate_clients: int = 24
    overload: float = 2.0  # offered load / calibrated capacity
    workers: int = 2
    dtype: str = "bfloat16"
    max_tokens: tuple[int, int] = (16, 48)  # uniform
    prompt_words: tuple[int, int] = (20, 120)
    stream_fraction: float = 0.8
    disconnect_fraction: float = 0.15  # clients that leave at a random moment
    disconnect_after_s: tuple[float, float] = (0.2, 6.0)
    kill_at: float = 0.25  # of the overload phase: the restarted worker then lives long enough to judge
    restart_after_s: float = 15.0
    gateway_max_inflight: int = 48
    worker_max_waiting: int = 8
    worker_max_num_seqs: int = 16
    sample_every_s: float = 5.0
    seed: int = 0
    # ONEDNN_PRIMITIVE_CACHE_CAPACITY and LRU_CACHE_CAPACITY for the services; 0: not set, the services'
    # own defaults (the worker pads its steps to few shapes and bounds both caches itself,
    # libs/allocator_env.py). 1024 is the libraries' own size.
    engine_cache_capacity: int = 0


def _body(rng: random.Random, cfg: SoakConfig, index: int) -> tuple[dict, int]:
    n = rng.randint(*cfg.prompt_words)
    words = " ".join(rng.choice(WORDS) for _ in range(n))
    max_tokens = rng.randint(*cfg.max_tokens)
    body = {
        "messages": [{"role": "user", "content": f"Request {index}. Continue this text: {words}"}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": index,
        "ignore_eos": True,
    }
    return body, max_tokens


async def one_request(client, cfg: SoakConfig, rng: random.Random, index: int, phase: str) -> Record:
    body, max_tokens = _body(rng, cfg, index)
    stream = rng.random() < cfg.stream_fraction
    leave = rng.uniform(*cfg.disconnect_after_s) if rng.random() < cfg.disconnect_fraction else None
    rec = Record(index, phase, time.monotonic(), stream=stream, max_tokens=max_tokens, leave_after_s=leave)
    try:
        async with asyncio.timeout(leave if leave is not None else CLIENT_GIVES_UP_S):
            await (_streamed(client, body, rec) if stream else _whole(client, body, rec))
    except TimeoutError:
        if leave is not None and not rec.outcome:
            rec.outcome = "disconnected"
        else:
            rec.outcome, rec.detail = "lost", rec.detail or "client timeout"
    except Exception as exc:  # a broken connection, a malformed body: the request is lost
        rec.outcome, rec.detail = "lost", f"{type(exc).__name__}: {exc}"[:300]
    rec.end = time.monotonic()
    return rec


def _rejected_or_lost(rec: Record, status: int, text: str) -> None:
    rec.status = status
    if status in (429, 503):
        rec.outcome, rec.detail = "rejected", text[:120]
    else:
        rec.outcome, rec.detail = "lost", f"{status}: {text[:300]}"


async def _streamed(client, body: dict, rec: Record) -> None:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    finish, usage, done, error = None, None, False, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            _rejected_or_lost(rec, r.status_code, (await r.aread()).decode(errors="replace"))
            return
        rec.status = 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
            elif event.get("choices"):
                choice = event["choices"][0]
                if choice["delta"].get("content") and rec.ttft_s is None:
                    rec.ttft_s = time.monotonic() - rec.start
                finish = choice.get("finish_reason") or finish
            if event.get("usage"):
                usage = event["usage"]
    rec.tokens = usage["completion_tokens"] if usage else 0
    if done and error is None and finish == "length" and rec.tokens == rec.max_tokens:
        rec.outcome = "ok"
    else:
        rec.outcome = "lost"
        rec.detail = f"done={done} finish={finish} tokens={rec.tokens}/{rec.max_tokens} error={error}"[:300]


async def _whole(client, body: dict, rec: Record) -> None:
    r = await client.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        _rejected_or_lost(rec, r.status_code, r.text)
        return
    rec.status = 200
    out = r.json()
    rec.tokens = out["usage"]["completion_tokens"]
    finish = out["choices"][0]["finish_reason"]
    if finish == "length" and rec.tokens == rec.max_tokens:
        rec.outcome = "ok"
    else:
        rec.outcome, rec.detail = "lost", f"finish={finish} tokens={rec.tokens}/{rec.max_tokens}"


async def calibrate(client, cfg: SoakConfig, rng: random.Random) -> tuple[float, list[Record]]:
    """Closed loop with enough clients to keep every worker's batch full: completed requests/s."""
    records: list[Record] = []
    stop_at = time.monotonic() + cfg.calibrate_s
    counter = iter(range(10**9))

    async def client_loop() -> None:
        while time.monotonic() < stop_at:
            rec = await one_request(client, _no_disconnect(cfg), rng, next(counter), "calibrate")
            records.append(rec)
            if rec.outcome == "rejected":
                await asyncio.sleep(0.5)

    t0 = time.monotonic()
    await asyncio.gather(*(client_loop() for _ in range(cfg.calibrate_clients)))
    ok = [r for r in records if r.outcome == "ok"]
    return len(ok) / (time.monotonic() - t0), records


def _no_disconnect(cfg: SoakConfig) -> SoakConfig:
    return replace(cfg, disconnect_fraction=0.0, stream_fraction=1.0)


async def overload(
    client, cfg: SoakConfig, rng: random.Random, rate: float, mesh, events: list
) -> list[Record]:
    """Poisson arrivals at `rate` for the phase; the worker kill and restart on their schedule."""
    tasks: list[asyncio.Task] = []
    t0 = time.monotonic()
    kill_at, restart_at = (
        t0 + cfg.kill_at * cfg.duration_s,
        t0 + cfg.kill_at * cfg.duration_s + cfg.restart_after_s,
    )
    killed = restarted = False
    index = 10**6
    next_arrival = t0
    while (now := time.monotonic()) < t0 + cfg.duration_s:
        if not killed and now >= kill_at:
            mesh.kill(VICTIM)
            killed = True
            events.append({"t": round(now - t0, 2), "event": f"SIGKILL {VICTIM}"})
        if killed and not restarted and now >= restart_at:
            mesh.restart(VICTIM)
            restarted = True
            events.append({"t": round(now - t0, 2), "event": f"restart {VICTIM}"})
            tasks.append(asyncio.create_task(_note_when_back(mesh.nats_url, events, t0)))
        if now >= next_arrival:
            index += 1
            tasks.append(asyncio.create_task(one_request(client, cfg, rng, index, "overload")))
            next_arrival += rng.expovariate(rate)
            continue
        await asyncio.sleep(min(0.05, next_arrival - now))
    events.append({"t": round(time.monotonic() - t0, 2), "event": "arrivals stop"})
    return [r for r in await asyncio.gather(*tasks) if isinstance(r, Record)]


async def _note_when_back(nats_url: str, events: list, t0: float) -> None:
    """The moment the restarted worker is live again (in the router's view): its engine is up."""
    from kvmesh.libs.bus import Bus, BusError
    from kvmesh.schemas.messages import RouterHealth, RouterHealthRequest, Subjects

    bus = await Bus.connect(nats_url, "soak-watch")
    try:
        while True:
            with contextlib.suppress(BusError):
                health = await bus.request(Subjects.ROUTER_HEALTH, RouterHealthRequest(), RouterHealth, 2)
                if VICTIM in health.workers:
                    events.append({"t": round(time.monotonic() - t0, 2), "event": f"{VICTIM} back"})
                    return
            await asyncio.sleep(0.5)
    finally:
        await bus.close()


def _cache_env(capacity: int) -> dict[str, str]:
    if not capacity:
        return {}
    return {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(capacity), "LRU_CACHE_CAPACITY": str(capacity)}


async def soak(cfg: SoakConfig, log_dir: Path) -> dict:
    import httpx

    from kvmesh.libs.engine.model_store import resolve_model
    from kvmesh.libs.launcher import Mesh, MeshConfig

    worker_args = ["--max-waiting", str(cfg.worker_max_waiting), "--heartbeat-interval", "0.5"]
    mesh_cfg = MeshConfig(
        model=str(resolve_model()),
        dtype=cfg.dtype,
        num_workers=cfg.workers,
        worker_args=[*worker_args, "--max-num-seqs", str(cfg.worker_max_num_seqs)],
        gateway_args=["--max-inflight", str(cfg.gateway_max_inflight)],
        log_dir=log_dir,
        metrics=False,
        env=_cache_env(cfg.engine_cache_capacity),
    )
    rng = random.Random(cfg.seed)
    events: list[dict] = []
    with Mesh(mesh_cfg) as mesh:
        await asyncio.to_thread(mesh.wait_ready, 240)
        sampler = RssSampler(mesh, cfg.sample_every_s)
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop))
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
        async with httpx.AsyncClient(
            base_url=mesh.base_url, timeout=httpx.Timeout(300), limits=limits
        ) as client:
            capacity, calib = await calibrate(client, cfg, rng)
            rate = cfg.overload * capacity
            print(
                f"soak: capacity {capacity:.2f} requests/s; offering {rate:.2f}/s for {cfg.duration_s:.0f} s"
            )
            overload_t0 = time.monotonic() - sampler.t0
            records = await overload(client, cfg, rng, rate, mesh, events)
        await asyncio.sleep(3)  # let aborts and the last finishes settle
        stats = await worker_stats(mesh.nats_url, mesh.worker_ids)
        sampler.sample()
        stop.set()
        await sampling
        gateway_log = (log_dir / "gateway.log").read_text(errors="replace")
    moves = len(re.findall(r"moving it \(move", gateway_log))
    result = {
        "config": asdict(cfg),
        "capacity_requests_per_s": round(capacity, 3),
        "offered_requests_per_s": round(rate, 3),
        "calibration": summarize(calib),
        "overload": summarize(records),
        "events": events,
        "overload_started_s": round(overload_t0, 2),  # on the RSS series' clock
        "migrations": moves,
        "workers_after": stats,
    }
    return judge(result, sampler)


def judge(result: dict, sampler: RssSampler) -> dict:
    """The memory report and the verdict, from the run's records, events, worker stats and RSS."""
    t0 = result["overload_started_s"]
    back = next((e["t"] for e in result["events"] if e["event"].endswith("back")), None)
    memory = sampler.report(t0, t0 + back if back is not None else None, killed=VICTIM)
    result["memory"] = memory
    result["verdict"] = {
        "zero_lost": result["overload"]["lost"] == 0,
        "memory_flat": all(m["flat"] is not False for m in memory.values()),
        "all_blocks_returned": all(
            s["all_blocks_returned"] and s["integrity_error"] is None
            for s in result["workers_after"].values()
        ),
    }
    return result


def rejudge(path: Path) -> dict:
    """Judge a stored run again with today's rules (judge, RssSampler.report): the RSS series are in
    the file."""
    result = json.loads(path.read_text())
    sampler = RssSampler(SimpleNamespace(procs=[]), 0)
    sampler.series = {
        n: [(t, int(m * 2**20)) for t, m in v["series_mib"]] for n, v in result["memory"].items()
    }
    return judge(result, sampler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=SoakConfig.duration_s)
    p.add_argument("--calibrate", type=float, default=SoakConfig.calibrate_s)
    p.add_argument("--overload", type=float, default=SoakConfig.overload)
    p.add_argument("--seed", type=int, default=SoakConfig.seed)
    p.add_argument(
        "--engine-cache-capacity",
        type=int,
        default=SoakConfig.engine_cache_capacity,
        help="ONEDNN_PRIMITIVE_CACHE_CAPACITY and LRU_CACHE_CAPACITY of the services (0: their own defaults)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    p.add_argument("--rejudge", type=Path, help="recompute a stored result's memory report and verdict")
    a = p.parse_args(argv)
    if a.rejudge is not None:
        result = rejudge(a.rejudge)
        a.rejudge.write_text(json.dumps(result, indent=1) + "\n")
        print(f"soak: verdict {result['verdict']} -> {a.rejudge}")
        return 0 if all(result["verdict"].values()) else 1
    configure_threads(1)
    cfg = SoakConfig(
        duration_s=a.duration,
        calibrate_s=a.calibrate,
        overload=a.overload,
        seed=a.seed,
        engine_cache_capacity=a.engine_cache_capacity,
    )
    with tempfile.TemporaryDirectory(prefix="kvmesh-soak-") as tmp:
        result = asyncio.run(soak(cfg, Path(tmp)))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    o = result["overload"]
    print(
        f"soak: {o['requests']} requests: {o['ok']} ok, {o['rejected']} rejected (429/503), "
        f"{o['disconnected']} client disconnects, {o['lost']} lost; {result['migrations']} migrations"
    )
    print(f"soak: verdict {result['verdict']} -> {a.out}")
    return 0 if all(result["verdict"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
