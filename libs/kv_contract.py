"""The KV contract: block size, hash seed, hash namespace and cache-salt rule, derived in one place.

Block hashes made in two processes match only when both hash full blocks of the same size, with the
same seed, in the same namespace (the model's name) and salt the same way. The worker owns these
facts (its engine's block size, its hash seed, the model it serves): it publishes its contract
(`schemas.messages.KVContract`) in every heartbeat and in the header of every KV-event batch. The
readers of worker-made hashes (router, tokenizer, kv-index) hold workers to theirs through a
`ContractGate`: namespace and seed are their own (same model, same KVMESH_HASH_SEED), the block size
pinned by a flag or adopted from the workers. A worker whose contract differs is refused, with the
field that differs as the reason (the router logs and counts it), never silently mis-scored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import msgspec

from kvmesh.libs.engine.block_hash import hash_seed
from kvmesh.schemas.messages import KVContract

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16  # a worker's block size unless configured (KVMESH_BLOCK_SIZE)
CONTRACT_HEADER = "Kvmesh-Kv-Contract"  # a KV-event batch's publisher contract (JSON)
_FIELDS = ("version", "block_size", "hash_seed", "hash_namespace", "cache_salt_rule")


def hash_namespace(model: str) -> str:
    """The block-hash namespace of a model given by name or by folder: its last path component.
    The one derivation every process uses (a name, not the resolved folder: no process converts or
    even finds the weights to learn it)."""
    return Path(model).name or model


def kv_contract(model: str, block_size: int = DEFAULT_BLOCK_SIZE, seed: int | None = None) -> KVContract:
    """The contract of a process serving or hashing for `model` (seed None: KVMESH_HASH_SEED or the
    built-in default)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return KVContract(block_size=block_size, hash_seed=hash_seed(seed), hash_namespace=hash_namespace(model))


def contract_mismatch(expected: KVContract, got: KVContract) -> str | None:
    """The first field in which `got` differs from `expected` (the refusal's reason), or None."""
    for name in _FIELDS:
        if getattr(expected, name) != getattr(got, name):
            return name
    return None


def describe(contract: KVContract) -> str:
    return (
        f"block_size={contract.block_size} hash_seed={contract.hash_seed:#x} "
        f"namespace={contract.hash_namespace!r} salt={contract.cache_salt_rule} v{contract.version}"
    )


def contract_header(contract: KVContract) -> str:
    return msgspec.json.encode(contract).decode()


def parse_contract_header(value: str | None) -> KVContract | None:
    """A KV-event batch's contract header; None when absent or unreadable (a stock vLLM publisher)."""
    if not value:
        return None
    try:
        return msgspec.json.decode(value, type=KVContract)
    except msgspec.DecodeError:
        return None


class ContractGate:
    """The contract a reader of worker-made hashes holds workers to. The seed is its own; the
    namespace (its model's) and the block size too when pinned, else adopted from the first worker
    whose contract agrees on the pinned fields (`on_adopt` is told). Workers that publish no
    contract (stock publishers, older workers) pass: there is nothing to compare."""

    def __init__(
        self,
        namespace: str | None,
        seed: int | None = None,
        block_size: int = 0,
        on_adopt: Callable[[KVContract], None] | None = None,
    ) -> None:
        self.namespace = namespace  # None: adopted
        self.seed = hash_seed(seed)
        self.pinned_block_size = block_size  # 0: adopted
        self.on_adopt = on_adopt
        self.contract: KVContract | None = None
        if block_size and namespace is not None:
            self.contract = KVContract(block_size=block_size, hash_seed=self.seed, hash_namespace=namespace)

    @classmethod
    def for_model(
        cls, model: str, block_size: int = 0, on_adopt: Callable[[KVContract], None] | None = None
    ) -> ContractGate:
        return cls(hash_namespace(model), None, block_size, on_adopt)

    @property
    def block_size(self) -> int:
        """The block size in force: pinned or adopted; the default until a worker is heard."""
        if self.contract is not None:
            return self.contract.block_size
        return self.pinned_block_size or DEFAULT_BLOCK_SIZE

    def expectation(self) -> str:
        """What workers are held to, for a log line (fields still to adopt say so)."""
        if self.contract is not None:
            return describe(self.contract)
        block_size = self.pinned_block_size or "the first worker's"
        namespace = repr(self.namespace) if self.namespace is not None else "the first worker's"
        return f"block_size={block_size} hash_seed={self.seed:#x} namespace={namespace}"

    def check(self, got: KVContract | None) -> str | None:
        """None when a worker with contract `got` is in; else the field that differs."""
        if got is None:
            return None
        if self.contract is not None:
            return contract_mismatch(self.contract, got)
        own = KVContract(
            block_size=self.pinned_block_size or got.block_size,
            hash_seed=self.seed,
            hash_namespace=got.hash_namespace if self.namespace is None else self.namespace,
        )
        if reason := contract_mismatch(own, got):
            return reason
        self.contract = own
        log.info("KV contract adopted from the workers: %s", describe(own))
        if self.on_adopt is not None:
            self.on_adopt(own)
        return None
