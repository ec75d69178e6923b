"""Pluggable worker scoring. Lower is better; the router picks the minimum, ties broken at random."""

from __future__ import annotations

from typing import NamedTuple, Protocol

from kvmesh.schemas.messages import RouteRequest
from kvmesh.services.router.workers import WorkerInfo


class Score(NamedTuple):
    value: float
    reason: str


class Scorer(Protocol):
    def score(self, req: RouteRequest, worker: WorkerInfo) -> Score: ...


class LoadScorer:
    """Least outstanding tokens (queued prompt tokens + tokens still to decode), KV usage as a
    tie-breaker so an idle-but-full worker loses to an idle empty one."""

    def score(self, req: RouteRequest, worker: WorkerInfo) -> Score:
        return Score(worker.load_tokens + worker.stats.kv_usage, "load")
