"""Pluggable worker scoring. Lower is better; the router picks the minimum, ties broken at random.

Costs are in tokens of work the worker would have to do or finish first, so that prefix reuse and
load trade off in one unit: a worker that already holds 1,000 of the prompt's tokens saves that
much prefill, worth `prefill_weight` tokens of queue each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from kvmesh.schemas.messages import RouteRequest
from kvmesh.services.router.workers import WorkerInfo


class Score(NamedTuple):
    value: float
    reason: str


class Scorer(Protocol):
    def score(
        self, req: RouteRequest, worker: WorkerInfo, overlap_blocks: int, session_match: bool
    ) -> Score: ...


class LoadScorer:
    """Least outstanding tokens (queued prompt tokens + tokens still to decode), KV usage as a
    tie-breaker so an idle-but-full worker loses to an idle empty one."""

    def score(self, req: RouteRequest, worker: WorkerInfo, overlap_blocks: int, session_match: bool) -> Score:
        return Score(worker.load_tokens + worker.stats.kv_usage, "load")


@dataclass(frozen=True, slots=True)
class KVAwareScorer:
    """cost = prefill_weight * prompt tokens not cached on the worker + load_weight * its
    outstanding tokens - session_bonus (if the session's last turn ran there)."""

    block_size: int = 16
    prefill_weight: float = 1.0
    load_weight: float = 1.0
    session_bonus: float = 256.0

    def score(self, req: RouteRequest, worker: WorkerInfo, overlap_blocks: int, session_match: bool) -> Score:
        cached = min(overlap_blocks * self.block_size, req.num_tokens)
        cost = self.prefill_weight * (req.num_tokens - cached) + self.load_weight * worker.load_tokens
        cost += worker.stats.kv_usage
        if session_match:
            cost -= self.session_bonus
        reason = "prefix" if cached else ("session" if session_match else "load")
        return Score(cost, reason)
