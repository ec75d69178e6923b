"""The prefix-cache block hash: one pure function, identical in every process and on every machine.

h_i = xxh3_64(seed, h_{i-1} || tokens of block i || extra keys). Chained, so a block's hash names its
whole prefix; seeded and independent of Python's salted hash(); extra keys (the model's name, later
LoRA) keep namespaces apart. A request's cache salt is an extra key of its first block only (vLLM's
rule): the chain carries it to every later block, so a salted prompt shares no block with an unsalted
or differently salted one. Only full blocks are hashed. Which block size, seed and namespace a
process hashes with is its KV contract (libs/kv_contract.py).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from typing import NewType

import msgspec
import xxhash

BlockHash = NewType("BlockHash", int)

DEFAULT_HASH_SEED = 0x6B766D657368  # "kvmesh"


def hash_seed(seed: int | None = None) -> int:
    """The seed in force: explicit, else KVMESH_HASH_SEED, else the built-in default."""
    if seed is not None:
        return seed
    return int(os.environ.get("KVMESH_HASH_SEED", DEFAULT_HASH_SEED))


def root_hash(seed: int) -> BlockHash:
    """The parent of the first block of every prompt."""
    return BlockHash(xxhash.xxh3_64_intdigest(b"kvmesh-root", seed=seed))


def hash_block(parent: BlockHash, tokens: Sequence[int], extra_keys: bytes, seed: int) -> BlockHash:
    """Hash of one full block given its parent's hash, its token ids and encoded extra keys."""
    data = parent.to_bytes(8, "little") + array("I", tokens).tobytes() + extra_keys
    return BlockHash(xxhash.xxh3_64_intdigest(data, seed=seed))


def encode_extra_keys(model: str, lora: str | None = None, cache_salt: str | None = None) -> bytes:
    """The namespace a hash lives in, encoded once per request."""
    return msgspec.msgpack.encode((model, lora, cache_salt))


def hash_blocks(
    tokens: Sequence[int],
    block_size: int,
    extra_keys: bytes,
    seed: int,
    parent: BlockHash | None = None,
    first_extra_keys: bytes | None = None,
) -> list[BlockHash]:
    """Chained hashes of every full block of `tokens` (a trailing partial block is not hashed).
    `first_extra_keys` (a salted request's, see salted_extra_keys) replaces `extra_keys` for the
    prompt's first block; it only applies when the chain starts at the root (`parent` None)."""
    out: list[BlockHash] = []
    prev = root_hash(seed) if parent is None else parent
    for start in range(0, len(tokens) - block_size + 1, block_size):
        keys = first_extra_keys if start == 0 and parent is None and first_extra_keys else extra_keys
        prev = hash_block(prev, tokens[start : start + block_size], keys, seed)
        out.append(prev)
    return out


def salted_extra_keys(extra_keys: bytes, cache_salt: str | None) -> bytes | None:
    """The extra keys of a salted prompt's first block, from its namespace's `extra_keys` (None:
    unsalted, the first block hashes like any other)."""
    if not cache_salt:
        return None
    model, lora, _ = msgspec.msgpack.decode(extra_keys)
    return encode_extra_keys(model, lora, cache_salt)
