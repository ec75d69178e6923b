"""Blocks pinned for a KV transfer, on either side of it.

Prefill side: a request that finishes with `hold_blocks` keeps its block references under its id
until the decode worker has pulled them (release) or the lease runs out (the worker calls release).
Decode side: blocks are reserved as the target of a pull; once the bytes have landed they are
committed into the prefix cache under the prompt's block hashes, so the request that follows finds
them like any local prefix hit (and the KV events announce them to the index).

Every reference taken here is counted by LLMEngine.check_integrity.
"""

from __future__ import annotations

from kvmesh.libs.engine.block_hash import BlockHash
from kvmesh.libs.engine.block_pool import BlockPool, KVBlock


class TransferBlocks:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.held: dict[str, list[KVBlock]] = {}  # prefill side: request id -> its blocks
        self.reserved: dict[str, list[KVBlock]] = {}  # decode side: transfer id -> pull targets

    @property
    def num_blocks(self) -> int:
        return sum(len(b) for b in self.held.values()) + sum(len(b) for b in self.reserved.values())

    # -- prefill side -------------------------------------------------------------------------------
    def hold(self, request_id: str, blocks: list[KVBlock]) -> list[int]:
        """Take over a finishing request's block references; returns the block ids."""
        self.held[request_id] = blocks
        return [b.block_id for b in blocks]

    def release(self, request_id: str) -> bool:
        blocks = self.held.pop(request_id, None)
        if blocks is None:
            return False
        self.pool.free_blocks(blocks[::-1])  # tail first: the prefix stays cached longest
        return True

    # -- decode side --------------------------------------------------------------------------------
    def reserve(self, transfer_id: str, n: int) -> list[int] | None:
        """Take n blocks as pull targets; None if the pool cannot spare them now."""
        if transfer_id in self.reserved:
            raise ValueError(f"transfer {transfer_id!r} already has blocks reserved")
        if n > self.pool.num_free_blocks:
            return None
        blocks = self.pool.get_new_blocks(n)
        self.reserved[transfer_id] = blocks
        return [b.block_id for b in blocks]

    def commit(
        self,
        transfer_id: str,
        hashes: list[BlockHash],
        parent: BlockHash | None,
        token_ids: list[int],
        extra_keys: list[tuple | None] | None = None,
    ) -> None:
        """The pulled bytes are in place: register the blocks as cached full blocks and let them go
        idle (ref 0, most recently used: evicted last). `extra_keys`: per block, for the event."""
        blocks = self.reserved.pop(transfer_id)
        self.pool.cache_full_blocks(blocks, hashes, parent, token_ids, extra_keys)
        self.pool.free_blocks(blocks[::-1])

    def cancel(self, transfer_id: str) -> None:
        """The pull failed or was abandoned: the blocks go back as plain free blocks."""
        blocks = self.reserved.pop(transfer_id, None)
        if blocks:
            self.pool.free_blocks(blocks)
