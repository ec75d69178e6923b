"""The baseline scorers (round-robin, random) and picking a scorer by name (pure logic)."""

import asyncio
from collections import Counter

import pytest
from helpers import heartbeat

from kvmesh.schemas.messages import RouteReply, RouteRequest
from kvmesh.services.router.scoring import (
    KVAwareScorer,
    LoadScorer,
    RandomScorer,
    RoundRobinScorer,
    make_scorer,
)
from kvmesh.services.router.service import RouterConfig, RouterService


def router_with(
    scorer, workers: list[str], loads: dict[str, int] | None = None, seed: int = 0
) -> RouterService:
    router = RouterService(RouterConfig(nats_url="", seed=seed), scorer)
    for wid in workers:
        beat(router, wid, (loads or {}).get(wid, 0))
    return router


def beat(router: RouterService, wid: str, outstanding: int = 0) -> None:
    router.registry.beat(heartbeat(wid, outstanding))


def pick(router: RouterService, i: int = 0, held: dict[str, int] | None = None) -> RouteReply:
    async def overlap(_req):
        return held or {}

    router.overlap = overlap
    req = RouteRequest(request_id=f"r{i}", num_tokens=256, max_tokens=8, block_hashes=list(range(16)))
    reply = asyncio.run(router.route(req))
    assert isinstance(reply, RouteReply)
    return reply


def test_round_robin_takes_turns_ignoring_load_and_cache_and_survives_churn():
    router = router_with(RoundRobinScorer(), ["b", "c", "a"], loads={"a": 10_000})
    held = {"c": 16}  # c holds the whole prompt: round-robin does not care
    picks = [pick(router, i, held).worker_id for i in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    assert {pick(router, 9).reason} == {"round-robin"}  # a's turn again
    del router.registry.workers["b"]  # b leaves: the turn passes from a to c, then wraps to a
    beat(router, "d")  # d joins
    assert [pick(router, i).worker_id for i in range(10, 14)] == ["c", "d", "a", "c"]
    # the index is still asked, so achieved vs available prefix hits stay measurable (in what the
    # engine reuses: 15 of the 256-token prompt's 16 blocks, its last token is always computed)
    assert router.available_hit_tokens == 6 * 240 and router.hit_tokens == 2 * 240


def test_random_spreads_uniformly_whatever_the_load_and_cache():
    router = router_with(RandomScorer(), ["a", "b", "c", "d"], loads={"a": 10_000}, seed=1)
    counts = Counter(pick(router, i, {"b": 16}).worker_id for i in range(2000))
    assert set(counts) == {"a", "b", "c", "d"}
    assert all(400 <= n <= 600 for n in counts.values()), counts  # 500 expected each, seeded
    assert pick(router, 1).reason == "random"


def test_scorers_by_name():
    assert isinstance(make_scorer("kv"), KVAwareScorer)
    assert isinstance(make_scorer("load"), LoadScorer)
    assert isinstance(make_scorer("round-robin"), RoundRobinScorer)
    assert isinstance(make_scorer("random"), RandomScorer)
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("fastest")
    # the KV-aware default still prefers the holder
    router = router_with(make_scorer("kv"), ["a", "b"])
    assert (pick(router, 0, {"b": 15}).worker_id, pick(router, 1, {"b": 15}).reason) == ("b", "prefix")
