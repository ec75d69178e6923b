"""The simulated stack prefix_bench.py runs its trace against, started fresh for every run.

`SimStack` starts nats-server, redis-server, the kv-index, the router (with the routing policy under
test) and one process of simulated workers; `BenchConfig` says how many workers, how much KV cache
each, and the workload (the real mesh's counterpart is libs/launcher.py's `Mesh`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.loadtest.prefix_workload import WorkloadSpec

# No bound on queued requests per worker: saturation shows as queueing (TTFT), not as refusals.
UNBOUNDED_QUEUE = ["--max-waiting", "0"]


@dataclass(frozen=True, slots=True)
class BenchConfig:
    name: str
    kind: str  # real | sim
    workers: int
    kv_blocks: int  # per worker
    spec: WorkloadSpec
    speedup: float = 1.0  # sim: modelled time runs this much faster than wall time
    drain_s: float = 10.0  # model seconds after the last arrival before in-flight requests are cut
    worker_args: list[str] = field(default_factory=list)


class SimStack:
    """nats-server, redis-server, kv-index, router (with the policy under test) and one process of
    simulated workers, each started fresh; logs under `log_dir`."""

    def __init__(
        self, cfg: BenchConfig, scorer: str, log_dir: Path, router_args: tuple[str, ...] = ()
    ) -> None:
        self.cfg, self.scorer, self.log_dir = cfg, scorer, log_dir
        self.router_args = router_args
        self.procs: list[subprocess.Popen] = []
        self.pids: dict[str, int] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="prefix-bench-")
        self.metrics_port = 0

    def __enter__(self) -> SimStack:
        from kvmesh.libs.launcher import free_port, start_nats_server, start_redis_server

        self.log_dir.mkdir(parents=True, exist_ok=True)
        nats_port, redis_port, self.metrics_port = free_port(), free_port(), free_port()
        self.nats_url, redis_url = f"nats://127.0.0.1:{nats_port}", f"redis://127.0.0.1:{redis_port}"
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.procs.append(start_nats_server(nats_port, Path(self._tmp.name) / "js", **quiet))
        self.procs.append(start_redis_server(redis_port, **quiet))
        env = {
            "KVMESH_NATS_URL": self.nats_url,
            "KVMESH_REDIS_URL": redis_url,
            "KVMESH_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
            "KVMESH_LOG_LEVEL": "WARNING",
        }
        c = self.cfg
        py = [sys.executable, "-m"]
        self._spawn("kv-index", [*py, "kvmesh.services.kv_index"], env)
        router = [
            *py,
            "kvmesh.services.router",
            "--scorer",
            self.scorer,
            "--metrics-port",
            str(self.metrics_port),
        ]
        self._spawn("router", [*router, *self.router_args], env)
        fleet = [*py, "kvmesh.services.sim_worker", "--count", str(c.workers), "--id-prefix", "sim"]
        fleet += ["--num-kv-blocks", str(c.kv_blocks), "--speedup", str(c.speedup), *UNBOUNDED_QUEUE]
        fleet += c.worker_args
        self._spawn("sim-workers", fleet, {**env, "KVMESH_LOG_LEVEL": "INFO"})
        asyncio.run(wait_workers(self.nats_url, c.workers, self.procs))
        return self

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (lives as long as the process)
        self.procs.append(
            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        )
        self.pids[name] = self.procs[-1].pid

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):  # services first (they drain), the infrastructure last
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._tmp.cleanup()


async def wait_workers(
    nats_url: str, count: int, procs: list[subprocess.Popen], timeout: float = 120
) -> None:
    """Until the router lists `count` live workers."""
    from kvmesh.libs.bus import Bus, BusError
    from kvmesh.schemas.messages import RouterHealth, RouterHealthRequest, Subjects

    bus = await Bus.connect(nats_url, "prefix-bench")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a process of the stack exited early (see the logs)")
            try:
                h = await bus.request(Subjects.ROUTER_HEALTH, RouterHealthRequest(), RouterHealth, timeout=2)
                if len(h.workers) >= count:
                    return
            except BusError:
                pass
            await asyncio.sleep(0.25)
        raise TimeoutError(f"the router did not see {count} workers in {timeout:.0f} s")
    finally:
        await bus.close()


def process_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds used so far, resident MiB) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    with open(f"/proc/{pid}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return cpu, rss_kib / 1024
