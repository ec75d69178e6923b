"""Start the whole mesh as local processes: nats-server and redis-server (unless given), then the
tokenizer, router, worker(s) and gateway. Used by `kvmesh up` and by the end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kvmesh.libs.local_servers import (  # noqa: F401 (re-exported: callers import them from here)
    embedded_valkey_binary,
    free_port,
    nats_server_binary,
    port_is_free,
    redis_server_binary,
    start_nats_server,
    start_redis_server,
    wait_for_port,
)

INFRA = ("nats", "redis")


@contextlib.contextmanager
def _signals_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class MeshConfig:
    model: str = "SmolLM2-135M-Instruct"
    dtype: str = "auto"  # bf16 where the CPU computes it natively, else fp32 (engine/config.py)
    num_workers: int = 1  # decode workers when num_prefill_workers > 0, else aggregated ones
    num_prefill_workers: int = 0  # > 0: disaggregated prefill (NIXL) on this many prefill workers
    gateway_port: int = 0  # 0: a free port
    nats_url: str | None = None  # None: start nats-server on a free port
    redis_url: str | None = None  # None: start redis-server on a free port (if installed)
    threads_per_worker: int = 0  # 0: share the cores evenly
    worker_args: list[str] = field(default_factory=list)
    prefill_worker_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    tokenizer_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None  # None: children inherit stdout/stderr
    log_level: str = "INFO"
    # Replicas of the stateless control-plane services (queue groups share their work; the kv-index
    # replicas share one write lease). Replica 0 is named "tokenizer", the next ones "tokenizer-1", ...
    tokenizer_replicas: int = 1
    router_replicas: int = 1
    kv_index_replicas: int = 1
    metrics: bool = True  # each service's /metrics and /health on a free port (the gateway: its own)
    env: dict[str, str] = field(default_factory=dict)  # extra environment (e.g. OTEL_*) for every service


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: IO | None = None
    # Starts the process again the way it first started (infra: same port, same store): restart()
    respawn: Callable[[], subprocess.Popen] | None = None
    env: dict[str, str] = field(default_factory=dict)  # the environment it was started with
    argv: list[str] = field(default_factory=list)


class Mesh:
    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.procs: list[Proc] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="kvmesh-")
        self.nats_url = config.nats_url or ""
        self.redis_url = config.redis_url or ""
        self.gateway_port = config.gateway_port or free_port()
        self.worker_ids: list[str] = []
        self.metrics_urls: dict[str, str] = {}  # process name -> its /metrics URL
        # Called by the wait loops instead of failing on the first exit (kvmesh up: Supervisor.tick)
        self.watchdog: Callable[[], None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def _log_file(self, name: str) -> IO | None:
        if self.config.log_dir is None:
            return None
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.config.log_dir / f"{name}.log", "ab")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self._log_file(name)
        full_env = {**os.environ, **(env or {})}
        # One OTEL_SERVICE_NAME for every process would merge them all into one service.
        full_env.pop("OTEL_SERVICE_NAME", None)
        full_env.update(self.config.env)
        if name not in INFRA:
            if name == "gateway":
                self.metrics_urls[name] = f"{self.base_url}/metrics"
            elif self.config.metrics:
                port = free_port()
                full_env |= {"KVMESH_METRICS_PORT": str(port), "KVMESH_METRICS_HOST": "127.0.0.1"}
                self.metrics_urls[name] = f"http://127.0.0.1:{port}/metrics"
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT if log else None, env=full_env)
        out = {"stdout": log, "stderr": subprocess.STDOUT if log else None}
        respawn = functools.partial(subprocess.Popen, argv, **out, env=full_env)
        proc = Proc(name, popen, log, respawn, full_env, argv)
        self.procs.append(proc)
        return proc

    def start_infra(self) -> None:
        if not self.nats_url:
            port = free_port()
            store = Path(self._tmp.name) / "jetstream"
            log = self._log_file("nats")
            out = {"stdout": log, "stderr": subprocess.STDOUT if log else None}
            popen = start_nats_server(port, store, **out)
            respawn = functools.partial(start_nats_server, port, store, **out)
            self.procs.append(Proc("nats", popen, log, respawn))
            self.nats_url = f"nats://127.0.0.1:{port}"
        if not self.redis_url and (binary := redis_server_binary()):
            port = free_port()
            log = self._log_file("redis")
            out = {"stdout": log, "stderr": subprocess.STDOUT if log else None}
            popen = start_redis_server(port, binary, **out)
            respawn = functools.partial(start_redis_server, port, binary, **out)
            self.procs.append(Proc("redis", popen, log, respawn, argv=[binary]))
            self.redis_url = f"redis://127.0.0.1:{port}"

    def start_services(self) -> None:
        cfg = self.config
        py = sys.executable
        common = {
            "KVMESH_NATS_URL": self.nats_url,
            "KVMESH_MODEL": cfg.model,
            "KVMESH_LOG_LEVEL": cfg.log_level,
            "OMP_WAIT_POLICY": "PASSIVE",
            "UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES", "lo"),  # NIXL between local workers
        }
        if self.redis_url:
            common["KVMESH_REDIS_URL"] = self.redis_url
        cores = len(os.sched_getaffinity(0))
        num_engines = cfg.num_workers + cfg.num_prefill_workers
        threads = cfg.threads_per_worker or max(1, cores // max(1, num_engines))
        argv = [py, "-m", "kvmesh.services.tokenizer", *cfg.tokenizer_args]
        self._spawn("tokenizer", argv, {**common, "KVMESH_THREADS": "1"})
        argv = [py, "-m", "kvmesh.services.router", *cfg.router_args]
        self._spawn("router", argv, {**common, "KVMESH_THREADS": "1"})
        if self.redis_url:
            self._spawn("kv-index", [py, "-m", "kvmesh.services.kv_index"], {**common, "KVMESH_THREADS": "1"})
        disaggregated = cfg.num_prefill_workers > 0
        roles = [("worker", "decode" if disaggregated else "aggregated", cfg.num_workers, cfg.worker_args)]
        roles.append(("prefill", "prefill", cfg.num_prefill_workers, cfg.prefill_worker_args))
        for prefix, role, count, extra in roles:
            for i in range(count):
                wid = f"{prefix}-{i}"
                self.worker_ids.append(wid)
                argv = [py, "-m", "kvmesh.services.worker", "--worker-id", wid, "--role", role]
                argv += ["--dtype", cfg.dtype, *extra]
                self._spawn(wid, argv, {**common, "KVMESH_THREADS": str(threads)})
        argv = [py, "-m", "kvmesh.services.gateway", "--port", str(self.gateway_port), *cfg.gateway_args]
        self._spawn("gateway", argv, {**common, "KVMESH_THREADS": "1"})
        self._spawn_replicas()

    def _spawn_replicas(self) -> None:
        """Replicas 1.. of the tokenizer, router and kv-index: replica 0's command line again."""
        cfg = self.config
        for name, count in (
            ("tokenizer", cfg.tokenizer_replicas),
            ("router", cfg.router_replicas),
            ("kv-index", cfg.kv_index_replicas),
        ):
            first = next((p for p in self.procs if p.name == name), None)
            for i in range(1, count if first is not None else 0):
                self._spawn(f"{name}-{i}", first.argv, first.env)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every worker has sent a heartbeat, the tokenizer and router answer, and the
        gateway answers /ready (a worker can take requests)."""
        deadline = time.monotonic() + timeout
        asyncio.run(self._wait_workers(deadline))
        asyncio.run(self._wait_services(deadline))
        # Every replica, not just one per queue group: a replica still loading does not take its share.
        self.wait_healthy(timeout=max(0.0, deadline - time.monotonic()))
        while True:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{self.base_url}/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not ready after {timeout:.0f} s")
            time.sleep(0.1)

    def wait_healthy(self, names: list[str] | None = None, timeout: float = 60.0) -> None:
        """Until each named service (default: every one with a metrics port) answers GET /health
        with 200, i.e. has attached its handlers to NATS. Used after `restart(name)` too."""
        deadline = time.monotonic() + timeout
        names = [n for n in self.metrics_urls if n != "gateway"] if names is None else names
        for name in names:
            url = self.metrics_urls[name].removesuffix("/metrics") + "/health"
            while True:
                self._check_alive()
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:  # not listening yet, or 503 (not attached yet)
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not healthy after {timeout:.0f} s")
                time.sleep(0.1)

    async def _wait_workers(self, deadline: float) -> None:
        from kvmesh.libs.bus import Bus, decode
        from kvmesh.schemas.messages import Heartbeat, Subjects

        bus = await Bus.connect(self.nats_url, "launcher")
        seen: set[str] = set()
        try:
            _sub, beats = await bus.subscribe_queue(Subjects.WORKER_HEARTBEAT)
            while not seen >= set(self.worker_ids):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"workers not ready: heard from {sorted(seen)} of {self.worker_ids}")
                self._check_alive()
                try:
                    raw = await asyncio.wait_for(beats.get(), min(remaining, 1.0))
                except TimeoutError:
                    continue
                seen.add(decode(raw.data, Heartbeat).stats.worker_id)
        finally:
            await bus.close()

    async def _wait_services(self, deadline: float) -> None:
        from kvmesh.libs.bus import Bus, BusError
        from kvmesh.schemas.messages import EncodeRequest, EncodeResult, RouteRequest, RouteResult, Subjects

        bus = await Bus.connect(self.nats_url, "launcher")
        probes = [
            (Subjects.TOKENIZER_ENCODE, EncodeRequest(request_id="ready", prompt="ready"), EncodeResult),
            (
                Subjects.ROUTER_ROUTE,
                RouteRequest(request_id="ready", num_tokens=0, max_tokens=0),
                RouteResult,
            ),
        ]
        try:
            for subject, msg, reply in probes:
                while True:
                    self._check_alive()
                    try:
                        await bus.request(subject, msg, reply, timeout=2)
                        break
                    except BusError:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"no answer on {subject}") from None
                        await asyncio.sleep(0.1)
        finally:
            await bus.close()

    def _check_alive(self) -> None:
        if self.watchdog is not None:
            return self.watchdog()
        for p in self.procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with code {p.popen.returncode}")

    def proc(self, name: str) -> subprocess.Popen:
        return next(p.popen for p in self.procs if p.name == name)

    # -- fault injection (tests) ---------------------------------------------------------------------
    def kill(self, name: str) -> None:
        """SIGKILL one process (a crash: no drain, no goodbye). It stays listed, dead, until
        `restart(name)`."""
        popen = self.proc(name)
        popen.kill()
        popen.wait()

    def pause(self, name: str) -> None:
        """SIGSTOP one process: hung, not dead. Its connections stay open, so NATS keeps its
        subscriptions (a queue group keeps handing it requests). `resume(name)` continues it; `stop()`
        continues paused ones too."""
        self.proc(name).send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        """SIGCONT one process (harmless if it is not paused)."""
        self.proc(name).send_signal(signal.SIGCONT)

    def restart(self, name: str) -> None:
        """Start a killed process again the way it first started: nats-server and redis-server on
        the same port (NATS with the same JetStream store), services with the same command line."""
        proc = next(p for p in self.procs if p.name == name)
        if proc.popen.poll() is None:
            raise RuntimeError(f"{name} is still running")
        if proc.respawn is None:
            raise RuntimeError(f"{name} cannot be restarted")
        proc.popen = proc.respawn()

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM the services (they drain), then the infrastructure; SIGKILL what lingers.
        A second Ctrl-C or SIGTERM meanwhile does not cut the cleanup short."""
        with _signals_ignored():
            self._stop(timeout)

    def _stop(self, timeout: float) -> None:
        infra = [p for p in self.procs if p.name in INFRA]
        services = [p for p in self.procs if p.name not in INFRA]
        for group in (services, infra):
            for p in group:
                if p.popen.poll() is None:
                    p.popen.send_signal(signal.SIGTERM)
                    p.popen.send_signal(signal.SIGCONT)  # a paused process handles it only once continued
            deadline = time.monotonic() + timeout
            for p in group:
                try:
                    p.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait()
                if p.log:
                    p.log.close()
        self.procs.clear()
        self._tmp.cleanup()

    def __enter__(self) -> Mesh:
        try:
            self.start_infra()
            self.start_services()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
