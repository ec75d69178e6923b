"""What an engine core reports about itself: its stats, and the invariant tying requests to blocks.

The real engine (LLMEngine) and the simulated one (sim_worker's SimCore) run the same block pool,
KV-cache manager and scheduler, so they count and check them here, the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from kvmesh.libs.engine.kv_cache_manager import KVCacheManager
from kvmesh.libs.engine.request import Request
from kvmesh.libs.engine.scheduler import Scheduler


class EngineStats(NamedTuple):
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    kv_usage: float
    num_preemptions: int
    prefix_hit_tokens: int
    prefix_query_tokens: int
    outstanding_tokens: int  # prompt tokens still to compute + output tokens still to generate
    num_leased_blocks: int = 0  # pinned for a KV transfer (held after prefill, or reserved for a pull)


def engine_stats(
    scheduler: Scheduler, requests: Iterable[Request], num_leased_blocks: int = 0
) -> EngineStats:
    """The counters of an engine whose scheduler is `scheduler` and whose live requests are `requests`."""
    pool = scheduler.kv.pool
    return EngineStats(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        num_blocks=pool.num_blocks,
        num_free_blocks=pool.num_free_blocks,
        num_cached_blocks=len(pool.cached),
        kv_usage=pool.usage(),
        num_preemptions=scheduler.num_preemptions,
        prefix_hit_tokens=scheduler.prefix_hit_tokens,
        prefix_query_tokens=scheduler.prefix_query_tokens,
        num_leased_blocks=num_leased_blocks,
        outstanding_tokens=outstanding_tokens(scheduler.kv, requests),
    )


def outstanding_tokens(kv: KVCacheManager, requests: Iterable[Request]) -> int:
    """Prompt tokens still to compute + output tokens still to generate. A waiting request's
    prompt tokens already in the prefix cache are no work (they are hits at admission): counting
    them made a worker holding a popular prefix look busy, and KV-aware routing spill away."""
    total = 0
    for r in requests:
        todo = r.num_tokens - r.num_computed_tokens
        if r.num_computed_tokens == 0:
            todo -= len(kv.get_computed_blocks(r)) * kv.block_size
        total += todo + r.params.max_tokens - r.num_output_tokens
    return total


def check_block_refs(scheduler: Scheduler, num_leased_blocks: int = 0) -> None:
    """The block pool's own invariants, then: every block reference is held by a running request
    or a transfer lease (`num_leased_blocks`), and waiting requests hold none. O(blocks)."""
    pool = scheduler.kv.pool
    pool.check_integrity()
    held = sum(len(r.blocks) for r in scheduler.running) + num_leased_blocks
    in_use = sum(b.ref_cnt for b in pool.blocks)
    assert held == in_use, f"requests and leases hold {held} block refs, pool counts {in_use}"
    assert all(not r.blocks for r in scheduler.waiting), "a waiting request holds blocks"
