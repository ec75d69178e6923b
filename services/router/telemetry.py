"""What a routing decision puts on the request's trace (the `kvmesh.router.route` SERVER span the
bus opened for it): the chosen worker, why, its score, the prefix reuse achieved and available, and
the best-scored candidates with their scores and cached blocks, and where the prompt is prefilled
(a prefill worker, or locally) and why."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace

from kvmesh.libs import tracing

MAX_CANDIDATES = 16  # a span is no place for hundreds of workers: the best ones tell the story


def trace_decision(
    worker_id: str,
    reason: str,
    score: float,
    cached_tokens: int,
    available_tokens: int,
    overlap: dict[str, int],
    workers: Sequence[Any],  # WorkerInfo of every candidate
    costs: Sequence[float],  # their scores, in the same order
    prefill: Any = None,  # disagg.PrefillChoice: where the prompt is prefilled, and why
) -> None:
    span = trace.get_current_span()
    if not span.is_recording():
        return
    best = best_candidates(costs, MAX_CANDIDATES)
    ids = [workers[i].stats.worker_id for i in best]
    span.set_attributes(
        {
            tracing.WORKER_ID: worker_id,
            "kvmesh.router.reason": reason,
            "kvmesh.router.score": float(score),
            tracing.CACHED_TOKENS: cached_tokens,
            "kvmesh.router.available_cached_tokens": available_tokens,
            "kvmesh.router.num_candidates": len(costs),
            "kvmesh.router.candidates": ids,
            "kvmesh.router.scores": [float(costs[i]) for i in best],
            "kvmesh.router.overlap_blocks": [overlap.get(w, 0) for w in ids],
        }
    )
    if prefill is not None:
        span.set_attribute("kvmesh.router.prefill_reason", prefill.reason)
        if prefill.worker is not None:
            span.set_attribute("kvmesh.router.prefill_worker_id", prefill.worker.stats.worker_id)


def best_candidates(costs: Sequence[float], k: int) -> list[int]:
    """Positions of the `k` lowest costs, best first."""
    return heapq.nsmallest(k, range(len(costs)), key=costs.__getitem__)
