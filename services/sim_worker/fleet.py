"""A fleet of simulated workers in one process and one event loop.

Each simulated worker is a real WorkerService (the worker's own NATS handlers, token streams and
heartbeats) over a SimLLM, plus its own KVEventPublisher (vLLM-shaped batches with per-worker
sequence numbers on JetStream): the router, kv-index and gateway cannot tell it from a real one.
Workers share NATS connections, `workers_per_connection` to a connection (nats-py gives every
subscription its own task, so sharing costs no head-of-line blocking, and hundreds of workers do
not need hundreds of sockets). Heartbeats are spread over the interval instead of all going out at
the same instant; one task publishes every worker's KV events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import NamedTuple

from kvmesh.libs.bus import Bus
from kvmesh.services.sim_worker.core import SimCore, SimEngineConfig
from kvmesh.services.sim_worker.sim_llm import SimLLM, close_all
from kvmesh.services.sim_worker.timing import TimingProfile
from kvmesh.services.worker.kv_events import KVEventPublisher
from kvmesh.services.worker.service import WorkerConfig, WorkerService

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FleetConfig:
    nats_url: str
    count: int
    id_prefix: str  # worker ids are <id_prefix>-<index>
    engine: SimEngineConfig
    profile: TimingProfile
    speedup: float = 1.0  # modelled durations are divided by this (2.0: twice as fast as the real engine)
    heartbeat_interval_s: float = 1.0
    kv_events_interval_s: float = 0.05
    workers_per_connection: int = 64
    drain_timeout_s: float = 5.0
    max_waiting: int = 64  # per worker, as WorkerConfig: beyond, generate answers "overloaded" (0: no bound)


class SimWorker(NamedTuple):
    service: WorkerService
    llm: SimLLM
    events: KVEventPublisher


class SimFleet:
    def __init__(self, config: FleetConfig) -> None:
        if config.count < 1:
            raise ValueError(f"count must be >= 1, got {config.count}")
        self.config = config
        self.buses: list[Bus] = []
        self.workers: list[SimWorker] = []
        self._tasks: list[asyncio.Task] = []

    @property
    def worker_ids(self) -> list[str]:
        return [w.service.config.worker_id for w in self.workers]

    async def start(self, stop: asyncio.Event) -> None:
        """Connect, attach every worker's handlers, publish each one's first (clearing) KV batch,
        then start heartbeats and event publishing until `stop`."""
        cfg = self.config
        n_conn = -(-cfg.count // max(1, cfg.workers_per_connection))
        self.buses = list(
            await asyncio.gather(
                *(Bus.connect(cfg.nats_url, f"{cfg.id_prefix}-conn{k}") for k in range(n_conn))
            )
        )
        for i in range(cfg.count):
            wid = f"{cfg.id_prefix}-{i}"
            llm = SimLLM(SimCore(cfg.engine, cfg.profile), cfg.speedup)
            service = WorkerService(
                WorkerConfig(
                    nats_url=cfg.nats_url,
                    worker_id=wid,
                    model=cfg.engine.model,
                    heartbeat_interval_s=cfg.heartbeat_interval_s,
                    max_waiting=cfg.max_waiting,
                ),
                llm,
            )
            bus = self.buses[i % n_conn]
            events = KVEventPublisher(
                bus, wid, llm.take_kv_events, cfg.kv_events_interval_s, llm.core.kv_contract
            )
            self.workers.append(SimWorker(service, llm, events))
        await asyncio.gather(*(self._attach(w, self.buses[i % n_conn]) for i, w in enumerate(self.workers)))
        spread = cfg.heartbeat_interval_s / cfg.count
        for i, w in enumerate(self.workers):
            self._tasks.append(asyncio.create_task(_after(i * spread, w.service.heartbeat_loop(stop))))
        self._tasks.append(asyncio.create_task(self._publish_events(stop)))
        log.info("%d simulated workers up on %d NATS connections", cfg.count, n_conn)

    async def _publish_events(self, stop: asyncio.Event) -> None:
        """Every worker's KV events, as KVEventPublisher.run does for one worker, from one task: one
        wake-up per interval for the whole fleet instead of one per worker (256 workers polling every
        50 ms kept a fifth of a core busy while idle). A failed batch stays pending for the next round,
        under the same sequence number."""
        pending: dict[int, list] = {}

        async def flush(i: int, events: list) -> None:
            try:
                await self.workers[i].events.publish(events)
                pending.pop(i, None)
            except Exception as exc:  # NATS reconnecting: keep the events
                log.warning("publishing %d KV events of %s failed: %r", len(events), self.worker_ids[i], exc)

        while True:
            for i, w in enumerate(self.workers):
                if new := w.llm.take_kv_events():
                    pending.setdefault(i, []).extend(new)
            if pending:
                await asyncio.gather(*(flush(i, events) for i, events in list(pending.items())))
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.kv_events_interval_s)

    @staticmethod
    async def _attach(w: SimWorker, bus: Bus) -> None:
        await w.service.attach(bus)
        await w.events.start()

    def report(self) -> dict[str, float]:
        """Totals over the fleet: steps, modelled busy time, and how late the loop woke them."""
        llms = [w.llm for w in self.workers]
        steps = sum(x.steps for x in llms)
        late = sum(x.late_steps for x in llms)
        return {
            "steps": steps,
            "busy_s": round(sum(x.busy_s for x in llms), 3),
            "late_steps": late,
            "late_fraction": round(late / steps, 4) if steps else 0.0,
            "mean_lag_ms_of_late": round(sum(x.lag_s_total for x in llms) / late * 1e3, 2) if late else 0.0,
        }

    async def report_loop(self, stop: asyncio.Event, every_s: float = 10.0) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
            log.info("fleet: %s", self.report())

    async def close(self) -> None:
        """Drain every worker (finish running requests within the timeout), stop, disconnect."""
        await asyncio.gather(*(w.service.drain(self.config.drain_timeout_s) for w in self.workers))
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await close_all([w.llm for w in self.workers])
        await asyncio.gather(*(b.close() for b in self.buses))


async def _after(delay_s: float, coro) -> None:
    await asyncio.sleep(delay_s)
    await coro
