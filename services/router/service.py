"""Router service: picks a worker per request from prefix overlap (kv-index), load (heartbeats)
and session affinity. Without the kv-index it keeps routing by load and reports itself degraded."""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass

from kvmesh.libs.bus import Bus, BusError
from kvmesh.libs.metrics import RouterMetrics
from kvmesh.schemas.messages import (
    ErrorReply,
    Heartbeat,
    OverlapReply,
    OverlapRequest,
    OverlapResult,
    RouteReply,
    RouteRequest,
    RouterHealth,
    RouterHealthRequest,
    Subjects,
)
from kvmesh.services.router.scoring import KVAwareScorer, Scorer
from kvmesh.services.router.telemetry import trace_decision
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
        self.metrics = RouterMetrics(config.model_name)

    async def overlap(self, req: RouteRequest) -> dict[str, int]:
        if not req.block_hashes or self.bus is None:
            return {}
        try:
            reply = await self.bus.request(
                Subjects.KV_INDEX_OVERLAP,
                OverlapRequest(block_hashes=req.block_hashes),
                OverlapResult,
                timeout=self.config.overlap_timeout_s,
            )
        except BusError as exc:
            if self.index_ok:
                log.warning("kv-index unavailable (%s): routing by load", exc)
            self.index_ok = False
            return {}
        if not isinstance(reply, OverlapReply):
            self.index_ok = False
            return {}
        self.index_ok = True
        return reply.overlap

    async def route(self, req: RouteRequest) -> RouteReply | ErrorReply:
        live = self.registry.live(req.exclude)
        if not live:
            return ErrorReply(code="no_workers", message="no live worker can take the request")
        overlap = await self.overlap(req) if len(live) > 1 else {}
        session_worker = self.sessions.get(req.session_id) if req.session_id else None
        self.scorer.begin(req, live)
        scored = [
            (
                self.scorer.score(
                    req, w, overlap.get(w.stats.worker_id, 0), w.stats.worker_id == session_worker
                ),
                w,
            )
            for w in live
        ]
        best = min(s.value for s, _ in scored)
        choice_score, choice = self.rng.choice([(s, w) for s, w in scored if s.value == best])
        wid = choice.stats.worker_id
        reason = choice_score.reason if len(live) > 1 else "only"
        block = getattr(self.scorer, "block_size", 16)
        cached = min(overlap.get(wid, 0) * block, req.num_tokens)
        # the work this request adds there until the next heartbeat reports it: uncached prefill + decode
        choice.assigned_tokens += req.num_tokens - cached + req.max_tokens
        available = min(max(overlap.values(), default=0) * block, req.num_tokens)
        self.decisions[reason] = self.decisions.get(reason, 0) + 1
        self.hit_tokens += cached
        self.available_hit_tokens += available
        self.metrics.decision(reason, cached, available)
        trace_decision(wid, reason, choice_score.value, cached, available, overlap, scored)
        if req.session_id:
            self.sessions[req.session_id] = wid
            self.sessions.move_to_end(req.session_id)
            if len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "route %s -> %s (%s) best of %d: %s",
                req.request_id,
                wid,
                reason,
                len(scored),
                _best(scored, overlap),
            )
        return RouteReply(worker_id=wid, reason=reason, score=choice_score.value)

    async def attach(self, bus: Bus) -> None:
        self.bus = bus

        async def on_route(req: RouteRequest, _raw) -> RouteReply | ErrorReply:
            start = time.perf_counter()
            try:
                return await self.route(req)
            finally:
                self.metrics.decision_seconds.observe(time.perf_counter() - start)

        async def on_beat(hb: Heartbeat, _raw) -> None:
            self.registry.beat(hb)

        async def on_health(_req: RouterHealthRequest, _raw) -> RouterHealth:
            return self.health()

        await bus.serve(Subjects.WORKER_HEARTBEAT, Heartbeat, on_beat)
        await bus.serve(Subjects.ROUTER_ROUTE, RouteRequest, on_route, queue="router")
        await bus.serve(Subjects.ROUTER_HEALTH, RouterHealthRequest, on_health)

    def health(self) -> RouterHealth:
        return RouterHealth(
            workers=sorted(w.stats.worker_id for w in self.registry.live()),
            kv_index_ok=self.index_ok,
            decisions=dict(self.decisions),
            hit_tokens=self.hit_tokens,
            available_hit_tokens=self.available_hit_tokens,
        )


def _best(scored: list, overlap: dict[str, int]) -> dict[str, tuple[float, int]]:
    """worker -> (score, cached blocks) of the best-scored candidates."""
    best = heapq.nsmallest(LOG_CANDIDATES, scored, key=lambda sw: sw[0].value)
    return {w.stats.worker_id: (round(sc.value, 1), overlap.get(w.stats.worker_id, 0)) for sc, w in best}
