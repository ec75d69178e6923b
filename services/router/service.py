"""Router service: picks a worker for each request (load now; KV-aware scoring plugs in later)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from kvmesh.libs.bus import Bus
from kvmesh.schemas.messages import ErrorReply, Heartbeat, RouteReply, RouteRequest, Subjects
from kvmesh.services.router.scoring import LoadScorer, Scorer
from kvmesh.services.router.workers import WorkerRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    nats_url: str
    seed: int | None = None


class RouterService:
    def __init__(self, config: RouterConfig, scorer: Scorer | None = None) -> None:
        self.config = config
        self.scorer: Scorer = scorer or LoadScorer()
        self.registry = WorkerRegistry()
        self.rng = random.Random(config.seed)
        self.decisions: dict[str, int] = {}

    def route(self, req: RouteRequest) -> RouteReply | ErrorReply:
        live = self.registry.live(req.exclude)
        if not live:
            return ErrorReply(code="no_workers", message="no live worker can take the request")
        scored = [(self.scorer.score(req, w), w) for w in live]
        best = min(s.value for s, _ in scored)
        choice_score, choice = self.rng.choice([(s, w) for s, w in scored if s.value == best])
        reason = choice_score.reason if len(live) > 1 else "only"
        choice.assigned_tokens += req.num_tokens + req.max_tokens
        self.decisions[reason] = self.decisions.get(reason, 0) + 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "route %s -> %s (%s) scores %s",
                req.request_id,
                choice.stats.worker_id,
                reason,
                {w.stats.worker_id: round(s.value, 2) for s, w in scored},
            )
        return RouteReply(worker_id=choice.stats.worker_id, reason=reason, score=choice_score.value)

    async def attach(self, bus: Bus) -> None:
        async def on_route(req: RouteRequest, _raw) -> RouteReply | ErrorReply:
            return self.route(req)

        async def on_beat(hb: Heartbeat, _raw) -> None:
            self.registry.beat(hb)

        await bus.serve(Subjects.WORKER_HEARTBEAT, Heartbeat, on_beat)
        await bus.serve(Subjects.ROUTER_ROUTE, RouteRequest, on_route, queue="router")
