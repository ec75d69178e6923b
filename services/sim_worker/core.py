"""The simulated engine core: the real engine's bookkeeping with the model forward replaced by a cost.

It runs the real pieces of `libs/engine`: the block pool (ref counts, LRU eviction, KV events), the
KV-cache manager (prefix-cache lookups, chained block hashes) and the scheduler (continuous batching
under a token budget, chunked prefill, preemption). So cache hits, evictions, the KV events the
kv-index sees and the batches that form are the engine's own. Only the forward is gone: `step()`
returns the step's outputs together with the time the timing model says the real engine would
have taken; the caller decides whether to wait that long (SimLLM) or just add it up (calibration).

Output tokens are deterministic pseudo-random ids: for greedy requests a function of the prompt
(like a real model's greedy output), otherwise of the seed or request id. They avoid the low,
special ids, so EOS never comes up and requests run to max_tokens (unless a stop id is drawn).
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass
from typing import NamedTuple

import xxhash

from kvmesh.libs.engine.block_hash import encode_extra_keys, salted_extra_keys
from kvmesh.libs.engine.block_pool import BlockPool
from kvmesh.libs.engine.introspection import EngineStats, check_block_refs, engine_stats
from kvmesh.libs.engine.kv_cache_manager import KVCacheManager
from kvmesh.libs.engine.outputs import RequestOutput, request_output
from kvmesh.libs.engine.request import FinishReason, Request
from kvmesh.libs.engine.sampling_params import InvalidRequestError, SamplingParams, check_prompt_tokens
from kvmesh.libs.engine.scheduler import Scheduler, SchedulerOutput
from kvmesh.libs.kv_contract import DEFAULT_BLOCK_SIZE, kv_contract
from kvmesh.schemas.kv_events import KVEvent
from kvmesh.services.sim_worker.timing import TimingProfile

FIRST_ORDINARY_TOKEN = 256  # below: special and byte tokens, never emitted


@dataclass(frozen=True, slots=True)
class SimEngineConfig:
    """The engine knobs a simulated worker honours (same meaning and defaults as EngineConfig)."""

    model: str = "SmolLM2-135M-Instruct"  # names the block-hash namespace, as the real engine does
    block_size: int = DEFAULT_BLOCK_SIZE
    num_kv_blocks: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192
    vocab_size: int = 49152
    hash_seed: int | None = None


class Planned(NamedTuple):
    sched: SchedulerOutput
    duration_s: float  # what the real engine would spend on this step


class SimStep(NamedTuple):
    outputs: list[RequestOutput]
    duration_s: float  # what the real engine would have spent on this step
    num_decodes: int
    num_prefill_tokens: int


class SimCore:
    """LLMEngine's request bookkeeping and scheduler over a real block pool, without the model."""

    def __init__(self, config: SimEngineConfig, profile: TimingProfile) -> None:
        self.config = config
        self.profile = profile
        self.pool = BlockPool(config.num_kv_blocks, config.block_size)
        self.kv = KVCacheManager(self.pool)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.kv_contract = kv_contract(config.model, config.block_size, config.hash_seed)
        self.hash_seed = self.kv_contract.hash_seed
        self.extra_keys = encode_extra_keys(self.kv_contract.hash_namespace)
        self.requests: dict[str, Request] = {}
        self._token_keys: dict[str, int] = {}  # request id -> seed of its output token stream
        self._pending: list[RequestOutput] = []  # abort outputs, delivered with the next step

    # -- requests --------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, token_ids: list[int], params: SamplingParams, cache_salt: str | None = None
    ) -> Request:
        """Validate and queue a request; raises InvalidRequestError naming the bad field (the real
        engine's checks, minus the ones that need a tokenizer)."""
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        params.validate()
        if not isinstance(token_ids, list) or not token_ids:
            raise InvalidRequestError("prompt", "must be a non-empty list of token ids")
        check_prompt_tokens(
            token_ids, self.config.vocab_size, self.config.max_model_len, self.kv.capacity_tokens
        )
        if params.stop_strings:
            raise InvalidRequestError("stop", "stop strings need the engine's tokenizer")
        req = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            params=params,
            extra_keys=self.extra_keys,
            hash_seed=self.hash_seed,
            cache_salt=cache_salt,
            first_block_keys=salted_extra_keys(self.extra_keys, cache_salt),
            stop_token_ids=tuple(sorted(set(params.stop_token_ids))),
        )
        self.requests[request_id] = req
        self._token_keys[request_id] = self._token_key(request_id, token_ids, params)
        self.scheduler.add(req)
        return req

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self._token_keys.pop(request_id, None)
        self.scheduler.finish(req, FinishReason.ABORT)
        self._pending.append(request_output(req, []))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending) or self.scheduler.has_work()

    # -- the step ---------------------------------------------------------------------------------
    def plan(self) -> Planned:
        """Schedule the next step (admissions, block allocation, preemptions happen now, as at the
        start of a real step) and cost it. Nothing is computed until `apply`."""
        sched = self.scheduler.schedule()
        if not sched:
            return Planned(sched, 0.0)
        duration = self.profile.step_time(
            [s.request.num_computed_tokens for s in sched.decodes],
            [(s.num_new_tokens, s.request.num_computed_tokens) for s in sched.prefills],
        )
        return Planned(sched, duration)

    def apply(self, planned: Planned) -> list[RequestOutput]:
        """The step's forward is done: its tokens are computed (and cached, recording KV events),
        sampling requests get their next token. Returns the step's outputs (and pending aborts')."""
        outputs, self._pending = self._pending, []
        sched = planned.sched
        if not sched:
            return outputs
        now = time.monotonic()
        for s in sched.decodes + sched.prefills:
            req = s.request
            if req.is_finished:  # aborted while its step ran: its blocks are already freed
                continue
            req.num_computed_tokens += s.num_new_tokens
            self.kv.cache_blocks(req)
        for s in sched.decodes + sched.prefills:
            if s.samples and not s.request.is_finished:
                outputs.append(self._append_token(s.request, now))
        return outputs

    def step(self) -> SimStep:
        """plan + apply at once, for callers that keep virtual time (calibration, tests)."""
        planned = self.plan()
        outputs = self.apply(planned)
        sched = planned.sched
        num_prefill = sum(s.num_new_tokens for s in sched.prefills)
        return SimStep(outputs, planned.duration_s, len(sched.decodes), num_prefill)

    def _append_token(self, req: Request, now: float) -> RequestOutput:
        token = self._next_token(req)
        reason = req.append_output_token(token, now, self.config.max_model_len)
        if reason is not None:
            self.requests.pop(req.request_id, None)
            self._token_keys.pop(req.request_id, None)
            self.scheduler.finish(req, reason)
        return request_output(req, [token], finished_at=now)

    def _token_key(self, request_id: str, token_ids: list[int], params: SamplingParams) -> int:
        if params.greedy:  # a real model's greedy output depends on the prompt only
            return xxhash.xxh3_64_intdigest(array("I", token_ids).tobytes())
        if params.seed is not None:
            return params.seed
        return xxhash.xxh3_64_intdigest(request_id.encode())

    def _next_token(self, req: Request) -> int:
        key = self._token_keys[req.request_id]
        h = xxhash.xxh3_64_intdigest(req.num_output_tokens.to_bytes(4, "little"), seed=key)
        return FIRST_ORDINARY_TOKEN + h % (self.config.vocab_size - FIRST_ORDINARY_TOKEN)

    # -- introspection ----------------------------------------------------------------------------
    def take_kv_events(self) -> list[KVEvent]:
        return self.pool.take_events()

    def stats(self) -> EngineStats:
        return engine_stats(self.scheduler, self.requests.values())

    def check_integrity(self) -> None:
        check_block_refs(self.scheduler)
