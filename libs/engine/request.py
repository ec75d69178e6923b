"""A request's engine-side state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvmesh.libs.detokenizer import IncrementalDetokenizer, StopStringMatcher
from kvmesh.libs.engine.block_hash import BlockHash, hash_block, root_hash
from kvmesh.libs.engine.block_pool import KVBlock
from kvmesh.libs.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvmesh.libs.engine.guided import GuidedState
    from kvmesh.libs.engine.token_counts import TokenCounts


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the caller


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    extra_keys: bytes  # block-hash namespace (model, lora)
    hash_seed: int
    cache_salt: str | None = None  # per-tenant isolation: an extra key of the first block only
    first_block_keys: bytes | None = None  # the first block's extra keys when salted (salted_extra_keys)
    stop_token_ids: tuple[int, ...] = ()  # EOS (unless ignore_eos) + params.stop_token_ids
    hold_blocks: bool = False  # on finishing keep the blocks pinned for a KV transfer (prefill role)
    # The scheduler's order, lower first (scheduler.py): (priority band, then the tenant's requests in
    # flight when the gateway dispatched it); equal ranks keep their arrival order.
    rank: tuple[int, int] = (0, 0)
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling (-1: not scheduled yet)
    blocks: list[KVBlock] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks registered in the prefix cache
    block_hashes: list[BlockHash] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    guided: GuidedState | None = None  # its grammar's matcher (guided.py), when the output is constrained
    token_counts: TokenCounts | None = None  # the penalties' statistics (token_counts.py), on first use
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    detokenizer: IncrementalDetokenizer | None = None
    stop_matcher: StopStringMatcher | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output_token(self, token: int, now: float, max_model_len: int) -> FinishReason | None:
        """Append a sampled token; returns why the request ends with it (a stop token id once
        min_tokens are out, or max_tokens / the context reached), None if it goes on. Stop strings
        need the text: the engine checks them on top."""
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_ids.append(token)
        if token in self.stop_token_ids and self.num_output_tokens >= self.params.min_tokens:
            return FinishReason.STOP
        if self.num_output_tokens >= self.params.max_tokens or self.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None

    def update_block_hashes(self, block_size: int) -> list[BlockHash]:
        """Extend the chained hashes to every full block of token_ids; returns them all."""
        hashes = self.block_hashes
        full = len(self.token_ids) // block_size
        prev = hashes[-1] if hashes else root_hash(self.hash_seed)
        for i in range(len(hashes), full):
            keys = self.first_block_keys if i == 0 and self.first_block_keys else self.extra_keys
            prev = hash_block(
                prev, self.token_ids[i * block_size : (i + 1) * block_size], keys, self.hash_seed
            )
            hashes.append(prev)
        return hashes
