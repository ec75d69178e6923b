"""The engine core: owns the model, the KV cache, the block pool and the scheduler; one `step()` at a time.

Not thread-safe by design: the async wrapper (async_engine.py) gives it a thread of its own.
"""

from __future__ import annotations

import logging
import threading
import time

from kvmesh.libs.detokenizer import IncrementalDetokenizer, StopStringMatcher, backend_tokenizer
from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, salted_extra_keys
from kvmesh.libs.engine.block_pool import BlockPool
from kvmesh.libs.engine.config import EngineConfig, parse_dtype
from kvmesh.libs.engine.guided import GrammarCompilerCache, advance_grammar
from kvmesh.libs.engine.introspection import EngineStats, check_block_refs, engine_stats
from kvmesh.libs.engine.kv_cache_manager import KVCacheManager
from kvmesh.libs.engine.kv_memory import alloc_kv_cache
from kvmesh.libs.engine.llama import LlamaModel
from kvmesh.libs.engine.model_runner import ModelRunner
from kvmesh.libs.engine.model_store import resolve_model
from kvmesh.libs.engine.outputs import RequestOutput, TokenLogprob, request_output
from kvmesh.libs.engine.request import FinishReason, Request
from kvmesh.libs.engine.sampling_params import (
    InvalidRequestError,
    SamplingParams,
    check_logit_bias,
    check_prompt_tokens,
)
from kvmesh.libs.engine.scheduler import Scheduler
from kvmesh.libs.engine.step_shapes import StepBuckets
from kvmesh.libs.engine.transfer_blocks import TransferBlocks
from kvmesh.libs.kv_contract import kv_contract
from kvmesh.schemas.kv_events import KVEvent

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, load_tokenizer: bool = True) -> None:
        self.config = config = config or EngineConfig()
        self.model_path = resolve_model(config.model)
        dtype = parse_dtype(config.dtype)
        self.model = LlamaModel.load(self.model_path, dtype)
        mcfg = self.model.cfg
        self.max_model_len = min(config.max_model_len or mcfg.max_model_len, mcfg.max_model_len)
        self.tokenizer = None
        if load_tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            self._backend_tokenizer = backend_tokenizer(self.tokenizer)
        bs = config.block_size
        # one block of all layers: 2 (K, V) x layers x block_size x kv_heads x head_dim elements
        block_bytes = 2 * mcfg.num_layers * bs * mcfg.num_kv_heads * mcfg.head_dim * dtype.itemsize
        num_blocks = config.num_kv_blocks or max(1, int(config.kv_cache_memory_gb * 2**30 // block_bytes))
        # Block-major: kv_cache[b] is one contiguous range holding block b of every layer (one NIXL
        # descriptor per block). Inside a block each head's [block_size, head_dim] run is contiguous.
        self.kv_cache = alloc_kv_cache(
            (num_blocks, mcfg.num_layers, 2, mcfg.num_kv_heads, bs, mcfg.head_dim), dtype
        )
        self.pool = BlockPool(num_blocks, bs, enable_caching=config.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool)
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill
        )
        buckets = StepBuckets() if config.bucket_step_shapes else StepBuckets.exact()
        self.runner = ModelRunner(self.model, self.kv_cache, bs, buckets, config.cpu_attention_kernel)
        # what its block hashes mean to the rest of the mesh (published in the worker's heartbeats)
        self.kv_contract = kv_contract(config.model, bs, config.hash_seed)
        self.hash_seed = self.kv_contract.hash_seed
        self.extra_keys = encode_extra_keys(self.kv_contract.hash_namespace)
        self.requests: dict[str, Request] = {}
        self.transfers = TransferBlocks(self.pool)
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        self._grammars: GrammarCompilerCache | None = None  # guided decoding, built on first use
        self._grammars_lock = threading.Lock()  # the worker compiles off the engine thread too

    # -- requests --------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "text prompts need the engine's tokenizer")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return prompt

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Check a request without queueing it; returns its prompt token ids. Raises
        InvalidRequestError naming the bad field."""
        params.validate()
        if not isinstance(prompt, str | list):
            raise InvalidRequestError(
                "prompt", f"must be text or a list of token ids, got {type(prompt).__name__}"
            )
        token_ids = self.tokenize_prompt(prompt)
        if not token_ids:
            raise InvalidRequestError("prompt", "is empty")
        check_prompt_tokens(token_ids, self.model.cfg.vocab_size, self.max_model_len, self.kv.capacity_tokens)
        check_logit_bias(params, self.model.cfg.vocab_size)
        if params.stop_strings and self.tokenizer is None:
            raise InvalidRequestError("stop", "stop strings need the engine's tokenizer")
        return token_ids

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        hold_blocks: bool = False,
        cache_salt: str | None = None,
        rank: tuple[int, int] = (0, 0),
    ) -> Request:
        """Validate and queue a request. Raises InvalidRequestError naming the bad field.
        `hold_blocks`: when it finishes, keep its blocks pinned (see release_held). `cache_salt`:
        its prefix is shared only with requests of the same salt (block_hash.py). `rank`: the
        scheduler's order, lower first (scheduler.py)."""
        if request_id in self.requests or request_id in self.transfers.held:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        token_ids = self.validate(prompt, params)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.model.cfg.eos_token_ids)
        req = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            params=params,
            extra_keys=self.extra_keys,
            hash_seed=self.hash_seed,
            cache_salt=cache_salt,
            first_block_keys=salted_extra_keys(self.extra_keys, cache_salt),
            stop_token_ids=tuple(sorted(stop_ids)),
            hold_blocks=hold_blocks,
            rank=rank,
        )
        if params.guided is not None:
            req.guided = self.grammars.state(params.guided, req.stop_token_ids)
            if params.resumed_tokens:  # a migrated request: its earlier output ends the prompt
                req.guided.resume(token_ids[-params.resumed_tokens :])
        if self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(self._backend_tokenizer, params.skip_special_tokens)
            req.stop_matcher = StopStringMatcher(params.stop_strings, params.include_stop_str_in_output)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    @property
    def grammars_loaded(self) -> bool:
        return self._grammars is not None

    @property
    def grammars(self) -> GrammarCompilerCache:
        """Guided decoding's compiler and compiled-grammar cache (xgrammar loads on first use)."""
        with self._grammars_lock:
            if self._grammars is None:
                tokenizer = self.tokenizer
                if tokenizer is None:  # a worker's engine (the gateway detokenizes): the vocabulary only
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(self.model_path)
                self._grammars = GrammarCompilerCache(tokenizer, self.model.cfg.vocab_size)
            return self._grammars

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; its final output comes from the next step()."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, FinishReason.ABORT)
        self._pending.append(request_output(req, []))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending) or self.scheduler.has_work()

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if not sched:
            return outputs
        result = self.runner.execute(sched)
        for s in sched.decodes + sched.prefills:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            self.kv.cache_blocks(req)
        now = time.monotonic()
        for req, token, lp in zip(
            result.requests, result.sample.token_ids, result.sample.logprobs, strict=True
        ):
            outputs.append(self._append_token(req, token, lp, now))
        return outputs

    def _append_token(self, req: Request, token: int, lp, now: float) -> RequestOutput:
        reason = req.append_output_token(token, now, self.max_model_len)
        if req.guided is not None and advance_grammar(req.guided, req.request_id, token):
            reason = FinishReason.STOP  # the grammar is complete (or refused the token)
        params = req.params
        text = ""
        if req.detokenizer is not None and req.stop_matcher is not None:
            match = req.stop_matcher.feed(req.detokenizer.step(token))
            text = match.emit
            if match.stopped and req.num_output_tokens >= params.min_tokens:
                reason = FinishReason.STOP
            elif reason is not None:
                text += req.stop_matcher.flush()
        logprobs = [TokenLogprob(token, lp[0], lp[1])] if lp is not None else None
        held = None
        if reason is not None:
            self.requests.pop(req.request_id, None)
            if req.hold_blocks:
                held = self.transfers.hold(req.request_id, req.blocks)
                req.blocks = []  # the lease owns the references now
            self.scheduler.finish(req, reason)
        out = request_output(req, [token], text, logprobs)
        out.held_block_ids = held
        return out

    # -- KV transfer ------------------------------------------------------------------------------
    def num_cached_prefix_blocks(self, token_ids: list[int], cache_salt: str | None = None) -> int:
        """How many leading full blocks of `token_ids` (salted with `cache_salt`) this engine's prefix
        cache holds now."""
        first = salted_extra_keys(self.extra_keys, cache_salt)
        hashes = hash_blocks(token_ids, self.config.block_size, self.extra_keys, self.hash_seed, None, first)
        n = 0
        for h in hashes:
            if self.pool.lookup(h) is None:
                break
            n += 1
        return n

    def release_held(self, request_id: str) -> bool:
        return self.transfers.release(request_id)

    # -- introspection ----------------------------------------------------------------------------
    def take_kv_events(self) -> list[KVEvent]:
        return self.pool.take_events()

    def stats(self) -> EngineStats:
        return engine_stats(self.scheduler, self.requests.values(), self.transfers.num_blocks)

    def check_integrity(self) -> None:
        check_block_refs(self.scheduler, self.transfers.num_blocks)
