"""Guided decoding: a grammar every output token must follow, enforced as a batched token bitmask.

Grammars are compiled by xgrammar (a pushdown automaton over the tokenizer's vocabulary, with token
masks precomputed per grammar state). Why xgrammar: its per-token cost is filling one bitmask row
from a precomputed cache (`loadtest/guided_bench.py` measures it on the default model), it compiles
JSON schema, regex, EBNF and choices, and its CPU kernel applies the mask to a float32 logits row in
place. llguidance (also Rust, lazily computed masks) and outlines-core (regex automata, JSON schema
through regex) were the alternatives; see the README's Structured output section.

Contract:
- `GrammarSpec` (sampling_params.py) is a pure value (kind + text); equal specs compile once
  (`GrammarCompilerCache`, bounded LRU keyed by the spec), so a burst of requests with one schema
  pays one compilation.
- A request with a grammar carries a `GuidedState` (its matcher); the sampler masks the rows of
  such requests only (`mask_logits`): a batch without any grammar costs one `any()` over the batch.
- The engine advances the matcher with every accepted token (`GuidedState.accept`); once the
  grammar is complete only stop tokens are allowed, and a terminated matcher finishes the request
  with `stop`. A migrated request's matcher is advanced over the output it already produced
  (`resume`), so it continues in the same grammar state.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvmesh.libs.engine.sampling_params import GrammarSpec, InvalidRequestError

if TYPE_CHECKING:
    import xgrammar as xgr


log = logging.getLogger(__name__)

# xgrammar's messages start with "[hh:mm:ss] /project/cpp/<file>:<line>: ": not the client's business
_SOURCE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+:? *")

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


def choice_grammar(choices: list[str]) -> str:
    """EBNF that matches exactly one of `choices` (JSON string literals are valid EBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class GrammarCompilerCache:
    """xgrammar's compiler for one tokenizer, with compiled grammars kept by spec (LRU). Thread-safe:
    the worker compiles off the engine thread; the engine only looks up."""

    def __init__(self, tokenizer: Any, vocab_size: int, capacity: int = 256, threads: int = 2) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compilations = 0  # grammars compiled (cache misses), for tests and stats

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar of `spec` (cached). Raises InvalidRequestError naming spec.field."""
        key = spec.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(spec)  # outside the lock: compiling takes milliseconds to seconds
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            self.compilations += 1
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        c = self.compiler
        try:
            if spec.kind == "json_schema":
                # One line, OpenAI's separators: compact output, and the tool-call parsers' format.
                return c.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
            if spec.kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if spec.kind == "regex":
                return c.compile_regex(spec.value)
            if spec.kind == "choice":
                choices = json.loads(spec.value)
                if not (isinstance(choices, list) and choices and all(isinstance(x, str) for x in choices)):
                    raise ValueError("must be a non-empty list of strings")
                return c.compile_grammar(choice_grammar(choices))
            if spec.kind == "grammar":
                return c.compile_grammar(spec.value)
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = (
                _SOURCE_PREFIX.sub("", str(exc).strip()).splitlines()[0] if str(exc).strip() else repr(exc)
            )
            raise InvalidRequestError(spec.field, f"cannot compile the {spec.kind}: {reason}") from None
        raise InvalidRequestError(spec.field, f"unknown grammar kind {spec.kind!r}; one of {KINDS}")

    def state(self, spec: GrammarSpec, stop_token_ids: tuple[int, ...]) -> GuidedState:
        """A fresh matcher for one request. Its stop tokens are the request's (EOS unless ignore_eos,
        plus stop_token_ids); with none, the grammar's end alone terminates it."""
        compiled = self.compile(spec)
        matcher = self._xgr.GrammarMatcher(
            compiled,
            override_stop_tokens=list(stop_token_ids) or None,
            terminate_without_stop_token=not stop_token_ids,
        )
        return GuidedState(spec, matcher)

    def __len__(self) -> int:
        return len(self._cache)


@dataclass(slots=True, eq=False)
class GuidedState:
    """One request's position in its grammar."""

    spec: GrammarSpec
    matcher: xgr.GrammarMatcher

    def accept(self, token: int) -> bool:
        """Advance over a sampled token; False when the grammar rejects it (cannot happen for a token
        sampled under the mask, but a caller's own tokens may)."""
        return self.matcher.accept_token(token)

    def resume(self, output_ids: list[int]) -> None:
        """Advance over tokens produced before a migration (the tail of the new prompt)."""
        for i, token in enumerate(output_ids):
            if not self.matcher.accept_token(token):
                raise InvalidRequestError(
                    self.spec.field, f"resumed output token {i} ({token}) does not match the grammar"
                )

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


def advance_grammar(state: GuidedState, request_id: str, token: int) -> bool:
    """Advance a request's grammar over its new token; True when the request must finish here: the
    grammar is complete (its stop token accepted, or its end reached when it has no stop token), or
    it refused the token (only possible when every token was masked: min_tokens holding back the
    stop tokens the complete grammar allows)."""
    if state.accept(token):
        return state.terminated
    log.warning("%s: token %d does not match the grammar (%s); finishing", request_id, token, state.spec.kind)
    return True


def mask_logits(logits: torch.Tensor, states: list[GuidedState | None]) -> torch.Tensor:
    """A copy of `logits` (float32 [len(states), vocab]) with every token a guided row's grammar
    forbids set to -inf; rows without a grammar are untouched (the copy keeps the raw logits for
    logprobs). One bitmask for the batch, applied by xgrammar's CPU kernel to the guided rows only."""
    import xgrammar as xgr

    rows = [i for i, s in enumerate(states) if s is not None and not s.terminated]
    if not rows:
        return logits
    vocab = logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(len(states), vocab)
    for i in rows:
        states[i].matcher.fill_next_token_bitmask(bitmask, i)  # type: ignore[union-attr]
    masked = logits.clone()
    xgr.apply_token_bitmask_inplace(masked, bitmask, vocab_size=vocab, indices=rows)
    return masked
