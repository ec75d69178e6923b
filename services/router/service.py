"""Router service: picks a worker per request from prefix overlap (the KV index), load (heartbeats)
and session affinity. Without the index it keeps routing by load and reports itself degraded.

Overlaps count blocks; the block size they are worth, like the hash seed and namespace, is the KV
contract (libs/kv_contract.py): the router's namespace and seed are its own, its block size pinned
(`--block-size`) or adopted from the first worker heard. A worker whose heartbeat publishes another
contract is refused (logged, `kvmesh:router_workers_refused_total{reason}`): its cache could only be
mis-scored. A request hashed with another block size (a tokenizer that has not heard the workers
yet) is routed by load.

The index is read from one of three places (`RouterConfig.index`): the kv-index service over NATS,
its Redis directly, or the router's own in-memory replica fed by the KV event stream (local_index.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

from redis.exceptions import RedisError

from kvmesh.libs.bus import RECONNECT_SETTLE_S, Bus, BusError
from kvmesh.libs.kv_contract import ContractGate, describe
from kvmesh.libs.metrics import RouterMetrics
from kvmesh.libs.prefix_index import PrefixIndexReader
from kvmesh.schemas.messages import (
    ErrorReply,
    Heartbeat,
    KVContract,
    OverlapReply,
    OverlapRequest,
    OverlapResult,
    RouteReply,
    RouteRequest,
    RouterHealth,
    RouterHealthRequest,
    Subjects,
    WorkerStats,
)
from kvmesh.services.router.disagg import PrefillPolicy
from kvmesh.services.router.local_index import LocalIndex
from kvmesh.services.router.scoring import KVAwareScorer, Scorer
from kvmesh.services.router.telemetry import best_candidates, trace_decision
from kvmesh.services.router.workers import WorkerRegistry

log = logging.getLogger(__name__)
MAX_SESSIONS = 100_000
LOG_CANDIDATES = 4  # a decision's log line names the best few workers, not hundreds


@dataclass(frozen=True, slots=True)
class RouterConfig:
    nats_url: str
    seed: int | None = None
    overlap_timeout_s: float = 0.05  # a slow index must not slow routing: fall back to load
    model_name: str = ""  # the model_name label of the router's metrics
    disagg_min_tokens: int = 512  # remote prefill only for at least this many uncached prompt tokens
    disagg_max_queue_tokens: int = 16384  # a prefill worker with this much outstanding work is saturated
    # Where prefix overlaps come from: "kv-index" (the service, over NATS), "redis" (the index in
    # Redis read directly, libs/prefix_index.py: one round trip and one process less per decision),
    # "local" (a replica of the index in this process, fed by the KV event stream: no round trip).
    # '' : "redis" when index_redis_url is set, else "kv-index".
    index: str = ""
    index_redis_url: str | None = None
    index_extra_keys: bytes = b""  # local: the hash namespace (encode_extra_keys of the model name)
    # The KV contract workers are held to (libs/kv_contract.py): the namespace ('' : the first
    # worker's) and the block size (0: the first worker's); the hash seed is KVMESH_HASH_SEED's.
    hash_namespace: str = ""
    block_size: int = 0
    silent_worker_s: float = 10.0  # local: a worker known only from its events is dropped after this
    # Heartbeats heard before the route subscription: a router that took routes at once (a restarted
    # replica) answered "no workers" to its share until the first beats came (1 s apart by default).
    warmup_s: float = 0.0

    @property
    def index_mode(self) -> str:
        return self.index or ("redis" if self.index_redis_url else "kv-index")


class RouterService:
    def __init__(self, config: RouterConfig, scorer: Scorer | None = None) -> None:
        self.config = config
        self.scorer: Scorer = scorer or KVAwareScorer()
        self.registry = WorkerRegistry()
        self.rng = random.Random(config.seed)
        self.sessions: OrderedDict[str, str] = OrderedDict()  # session id -> worker of its last turn
        self.decisions: dict[str, int] = {}
        self.hit_tokens = 0  # prompt tokens cached on the chosen worker
        self.available_hit_tokens = 0  # ... on the best worker for reuse (the oracle of this moment)
        self.index_ok = True
        self.bus: Bus | None = None
        self._forgiven = 0.0  # the bus reconnect whose silence the registry was told to ignore
        self.metrics = RouterMetrics(config.model_name)
        self.gate = ContractGate(config.hash_namespace or None, None, config.block_size, self._use_contract)
        self.refused: dict[str, str] = {}  # worker id -> why its contract was refused
        self._foreign_block_sizes: set[int] = set()  # request block sizes already warned about
        self.prefill_policy = PrefillPolicy(
            config.disagg_min_tokens, config.disagg_max_queue_tokens, self.gate.block_size
        )
        self._use_contract(self.gate.contract)
        self.index_reader: PrefixIndexReader | None = None
        self.local_index: LocalIndex | None = None
        mode = config.index_mode
        if mode == "redis":
            from kvmesh.libs.credentials import redis_client  # KVMESH_REDIS_* credentials

            if not config.index_redis_url:
                raise ValueError("--index redis needs a Redis URL")
            redis = redis_client(config.index_redis_url, socket_connect_timeout=1, socket_timeout=1)
            self.index_reader = PrefixIndexReader(redis)
        elif mode == "local":
            self.local_index = LocalIndex(
                config.index_extra_keys, silent_worker_s=config.silent_worker_s, gate=self.gate
            )
        elif mode != "kv-index":
            raise ValueError(f"unknown index {mode!r} (choose from kv-index, redis, local)")

    def _use_contract(self, contract: KVContract | None) -> None:
        """Score overlaps in the contract's blocks (adopted from the first worker, or pinned)."""
        if contract is None:
            return
        if isinstance(self.scorer, KVAwareScorer):
            self.scorer = replace(self.scorer, block_size=contract.block_size)
        self.prefill_policy = replace(self.prefill_policy, block_size=contract.block_size)

    def admit(self, stats: WorkerStats) -> bool:
        """Whether a worker's heartbeat is taken: its KV contract is the router's. A refusal is logged
        and counted once per worker and reason, and drops the worker if it was taken before."""
        wid = stats.worker_id
        reason = self.gate.check(stats.kv_contract)
        if reason is None:
            if self.refused.pop(wid, None) is not None:
                log.info("worker %s now matches the KV contract: taken", wid)
            return True
        if self.refused.get(wid) != reason:
            self.refused[wid] = reason
            self.metrics.refused(reason)
            assert stats.kv_contract is not None  # a worker without one is always taken
            log.warning(
                "refused worker %s: its KV contract differs in %s (worker: %s; router: %s)",
                wid,
                reason,
                describe(stats.kv_contract),
                self.gate.expectation(),
            )
        self.registry.drop(wid)
        return False

    def _index_answers(self, ok: bool, what: str) -> None:
        """Record (and log when it changes) whether the index answered."""
        if ok and not self.index_ok:
            log.info("%s answers again: routing by prefix overlap", what)
        elif not ok and self.index_ok:
            log.warning("%s unavailable: routing by load", what)
        self.index_ok = ok

    async def overlap(self, req: RouteRequest, timeout: float | None = None) -> dict[str, int]:
        if self.local_index is not None:
            ok = self.local_index.ok
            self._index_answers(ok, f"local KV index ({self.local_index.state})")
            return self.local_index.overlap(req.block_hashes) if ok and req.block_hashes else {}
        if self.index_reader is not None and req.block_hashes:
            return await self._read_index(req.block_hashes, timeout or self.config.overlap_timeout_s)
        if not req.block_hashes or self.bus is None:
            return {}
        try:
            reply = await self.bus.request(
                Subjects.KV_INDEX_OVERLAP,
                OverlapRequest(block_hashes=req.block_hashes),
                OverlapResult,
                timeout=timeout or self.config.overlap_timeout_s,
            )
        except BusError as exc:
            if self.index_ok:
                log.warning("kv-index unavailable (%s): routing by load", exc)
            self.index_ok = False
            return {}
        if not isinstance(reply, OverlapReply):
            if self.index_ok:
                log.warning("kv-index failed (%s: %s): routing by load", reply.code, reply.message)
            self.index_ok = False
            return {}
        if not self.index_ok:
            log.info("kv-index answers again: routing by prefix overlap")
        self.index_ok = True
        return reply.overlap

    async def _read_index(self, block_hashes: list[int], timeout: float) -> dict[str, int]:
        """The index's answer straight from Redis; any failure routes by load, as without the kv-index."""
        try:
            overlap = await asyncio.wait_for(self.index_reader.overlap(block_hashes), timeout)
        except (TimeoutError, RedisError, OSError) as exc:
            if self.index_ok:
                log.warning("KV index in Redis unavailable (%r): routing by load", exc)
            self.index_ok = False
            return {}
        if not self.index_ok:
            log.info("KV index in Redis answers again: routing by prefix overlap")
        self.index_ok = True
        return overlap

    async def check_index(self, timeout: float = 1.0) -> bool:
        """Ask the index now (one single-block query; the local replica: whether it is caught up and
        following the stream), so that health tells its state as of now, not as of the last routed
        request (a replica that routed nothing would not know)."""
        probe = RouteRequest(request_id="health", num_tokens=0, max_tokens=0, block_hashes=[0])
        await self.overlap(probe, timeout)
        return self.index_ok

    async def route(self, req: RouteRequest) -> RouteReply | ErrorReply:
        if self.bus is not None and self.bus.reconnected_at > self._forgiven:  # back from a NATS outage
            self._forgiven = self.bus.reconnected_at
            self.registry.forgive(self._forgiven + RECONNECT_SETTLE_S)
        workers = self.registry.live(req.exclude)
        live = [w for w in workers if w.stats.role != "prefill"]  # who can serve (decode) the request
        prefill_pool = [w for w in workers if w.stats.role == "prefill"]
        if not live:
            return ErrorReply(code="no_workers", message="no live worker can take the request")
        overlap = await self.overlap(req) if len(workers) > 1 and self._same_blocks(req) else {}
        block = self.gate.block_size
        session_worker = self.sessions.get(req.session_id) if req.session_id else None
        self.scorer.begin(req, live)
        costs = self.scorer.costs(req, live, overlap, session_worker)
        best = min(costs)
        choice = self.rng.choice([w for w, c in zip(live, costs, strict=True) if c == best])
        wid = choice.stats.worker_id
        choice_score = self.scorer.score(req, choice, overlap.get(wid, 0), wid == session_worker)
        reason = choice_score.reason if len(live) > 1 else "only"
        # what the engine will reuse: whole blocks, and never the prompt's last token (it computes
        # that one for its logits), so the counts equal the worker's own cached_tokens
        reusable = max(0, req.num_tokens - 1) // block
        cached = min(overlap.get(wid, 0), reusable) * block
        prefill = self.prefill_policy.choose(
            req.num_tokens, req.num_tokens - cached, prefill_pool, overlap, self.rng
        )
        if prefill_pool:  # a disaggregated mesh: count where each prompt was prefilled, and why
            prefill_key = f"prefill_{prefill.reason}"
            self.decisions[prefill_key] = self.decisions.get(prefill_key, 0) + 1
        # the work this request adds until the next heartbeats report it: uncached prefill + decode
        if prefill.worker is not None:
            prefill.worker.assigned_tokens += prefill.uncached_tokens
            choice.assigned_tokens += block + req.max_tokens  # the last partial block, then decode
        else:
            choice.assigned_tokens += req.num_tokens - cached + req.max_tokens
        available = min(max(overlap.values(), default=0), reusable) * block
        self.decisions[reason] = self.decisions.get(reason, 0) + 1
        self.hit_tokens += cached
        self.available_hit_tokens += available
        self.metrics.decision(reason, cached, available)
        trace_decision(wid, reason, choice_score.value, cached, available, overlap, live, costs, prefill)
        if req.session_id:
            self.sessions[req.session_id] = wid
            self.sessions.move_to_end(req.session_id)
            if len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        prefill_id = prefill.worker.stats.worker_id if prefill.worker is not None else None
        if log.isEnabledFor(logging.INFO):
            log.info(
                "route %s -> %s (%s) prefill %s (%s) best of %d: %s",
                req.request_id,
                wid,
                reason,
                prefill_id or "local",
                prefill.reason,
                len(live),
                _best(live, costs, overlap),
            )
        return RouteReply(
            worker_id=wid,
            reason=reason,
            score=choice_score.value,
            prefill_worker_id=prefill_id,
            prefill_reason=prefill.reason,
        )

    def _same_blocks(self, req: RouteRequest) -> bool:
        """Whether the request's hashes are in the contract's block size (0: the sender did not say)."""
        if not req.block_size or req.block_size == self.gate.block_size:
            return True
        if req.block_size not in self._foreign_block_sizes:
            self._foreign_block_sizes.add(req.block_size)
            log.warning(
                "request %s hashed in blocks of %d, the workers' are %d: routed by load (a tokenizer "
                "that has not heard the workers yet, or one pinned to another block size)",
                req.request_id,
                req.block_size,
                self.gate.block_size,
            )
        return False

    async def attach(self, bus: Bus) -> None:
        self.bus = bus

        async def on_route(req: RouteRequest, _raw) -> RouteReply | ErrorReply:
            start = time.perf_counter()
            try:
                return await self.route(req)
            finally:
                self.metrics.decision_seconds.observe(time.perf_counter() - start)

        async def on_beat(hb: Heartbeat, _raw) -> None:
            if not self.admit(hb.stats):
                return
            self.registry.beat(hb)
            if self.local_index is not None:
                self.local_index.beat(hb.stats.worker_id, hb.interval_s)

        async def on_health(_req: RouterHealthRequest, _raw) -> RouterHealth:
            await self.check_index()
            return self.health()

        await bus.serve(Subjects.WORKER_HEARTBEAT, Heartbeat, on_beat)
        if self.config.warmup_s > 0:
            await asyncio.sleep(self.config.warmup_s)  # one heartbeat round, with margin: see warmup_s
        await bus.serve(Subjects.ROUTER_ROUTE, RouteRequest, on_route, queue="router")
        # outside the queue group: the gateway's hedged try when a replica does not answer
        await bus.serve(Subjects.every_replica(Subjects.ROUTER_ROUTE), RouteRequest, on_route)
        await bus.serve(Subjects.ROUTER_HEALTH, RouterHealthRequest, on_health)
        if self.local_index is not None:
            await self.local_index.start(bus)

    async def close(self) -> None:
        if self.local_index is not None:
            await self.local_index.close()
        if self.index_reader is not None:
            await self.index_reader.redis.aclose()

    def health(self) -> RouterHealth:
        return RouterHealth(
            workers=sorted(w.stats.worker_id for w in self.registry.live()),
            kv_index_ok=self.index_ok,
            decisions=dict(self.decisions),
            hit_tokens=self.hit_tokens,
            available_hit_tokens=self.available_hit_tokens,
        )


def _best(live: list, costs: list[float], overlap: dict[str, int]) -> dict[str, tuple[float, int]]:
    """worker -> (score, cached blocks) of the best-scored candidates."""
    out = {}
    for i in best_candidates(costs, LOG_CANDIDATES):
        wid = live[i].stats.worker_id
        out[wid] = (round(costs[i], 1), overlap.get(wid, 0))
    return out
