"""KV-cache events: what a worker's block pool stored or dropped.

Shaped like vLLM's KV events (array-like msgpack, tagged union of BlockStored / BlockRemoved /
AllBlocksCleared inside an EventBatch) so that the kv-index can ingest stock vLLM publishers too.
The block pool records these; the worker drains and publishes them.
"""

from __future__ import annotations

from typing import Any

import msgspec

SCHEMA_VERSION = 1


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of the tagged union; the tag is the class name, as in vLLM."""


# A publisher's own block hash: an int (kvmesh, older vLLM) or bytes (newer vLLM's sha256 hashes).
EngineHash = int | bytes


class BlockStored(KVCacheEvent):
    block_hashes: list[EngineHash]  # publisher hashes of the newly cached full blocks, in prefix order
    parent_block_hash: EngineHash | None  # hash of the block before the first one; None at prompt start
    token_ids: list[int]  # all tokens of those blocks, concatenated
    block_size: int
    lora_id: int | None = None
    medium: str | None = "cpu"  # storage tier the blocks live in
    lora_name: str | None = None  # vLLM's field, in vLLM's place (kvmesh serves no LoRA yet)
    # Per block, the extra keys beyond the publisher's namespace (vLLM's layout: None for a block
    # without any). A salted prompt's first block carries its cache salt as the last key: the
    # index needs it to re-derive that block's key (block_hash.py); later blocks inherit it by chain.
    extra_keys: list[tuple[Any, ...] | None] | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[EngineHash]  # evicted blocks
    medium: str | None = "cpu"


class AllBlocksCleared(KVCacheEvent):
    """The worker dropped its whole prefix cache (reset, restart)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float  # wall-clock seconds when the batch was drained
    events: list[KVEvent]
    data_parallel_rank: int | None = None
