"""Sampling parameters and prompts, validated up front with errors that name the offending field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """A request the engine refuses; `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What the output must match (guided decoding, libs/engine/guided.py). `kind`: json_schema
    (value: the schema, JSON text), json_object (any JSON object; value ignored), regex, choice
    (value: a JSON list of strings), grammar (EBNF, xgrammar's / llama.cpp's GBNF dialect). `field`:
    the request field it came from, for errors."""

    kind: str
    value: str = ""
    field: str = "response_format"

    def key(self) -> tuple[str, str]:
        return (self.kind, self.value)


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per output token (0: only the sampled token's)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    # vLLM's definitions (libs/engine/logits_processors.py): frequency and presence count the output
    # tokens (a resumed request's earlier output included), repetition the prompt's and the output's.
    frequency_penalty: float = 0.0  # [-2, 2]
    presence_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # > 0; 1: off
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    min_p: float = 0.0  # [0, 1]: drop tokens less likely than min_p x the most likely one
    # A resumed (migrated) request: the prompt ends with this many tokens of its own earlier output;
    # a seeded generator skips the draws they used, so sampling continues where it left off.
    resumed_tokens: int = 0
    # Guided decoding: the grammar the output must follow (libs/engine/guided.py), None: free text.
    guided: GrammarSpec | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def validate(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise InvalidRequestError(name, msg)

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: object) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool)

        check(is_int(self.n) and self.n == 1, "n", f"only n=1 is supported, got {self.n!r}")
        check(
            is_int(self.max_tokens) and self.max_tokens >= 1,
            "max_tokens",
            f"must be >= 1, got {self.max_tokens!r}",
        )
        check(
            is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must be in [0, max_tokens], got {self.min_tokens!r}",
        )
        check(
            is_num(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be >= 0, got {self.temperature!r}",
        )
        check(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        check(
            is_int(self.top_k) and self.top_k >= -1,
            "top_k",
            f"must be -1, 0 (disabled) or >= 1, got {self.top_k!r}",
        )
        check(self.seed is None or is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            check(is_num(value) and -2 <= value <= 2, name, f"must be in [-2, 2], got {value!r}")
        check(
            is_num(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf,
            "repetition_penalty",
            f"must be > 0, got {self.repetition_penalty!r}",
        )
        check(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        check(
            self.logit_bias is None
            or (
                isinstance(self.logit_bias, dict)
                and all(is_int(t) and t >= 0 for t in self.logit_bias)
                and all(is_num(b) and math.isfinite(b) for b in self.logit_bias.values())
            ),
            "logit_bias",
            "must map non-negative token ids to finite numbers",
        )
        check(
            is_int(self.resumed_tokens) and self.resumed_tokens >= 0,
            "resumed_tokens",
            f"must be >= 0, got {self.resumed_tokens!r}",
        )
        stop_ok = (
            self.stop is None
            or isinstance(self.stop, str)
            or (isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop))
        )
        check(stop_ok, "stop", f"must be a string or a list of strings, got {type(self.stop).__name__}")
        check(
            isinstance(self.stop_token_ids, list) and all(is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "must be a list of non-negative integers",
        )
        check(
            self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= 20),
            "logprobs",
            f"must be an integer in [0, 20], got {self.logprobs!r}",
        )


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    """logit_bias names only tokens of the vocabulary."""
    bad = [t for t in params.logit_bias or () if t >= vocab_size]
    if bad:
        raise InvalidRequestError("logit_bias", f"token ids must be in [0, {vocab_size}), got {bad[0]}")


def check_prompt_tokens(token_ids: list[int], vocab_size: int, max_model_len: int, kv_tokens: int) -> None:
    """A non-empty prompt's token ids are in the vocabulary and leave room, in the model's context
    and in the KV cache (`kv_tokens`: KVCacheManager.capacity_tokens), for at least one output token."""
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in token_ids):
        raise InvalidRequestError("prompt", f"token ids must be integers in [0, {vocab_size})")
    if len(token_ids) >= max_model_len:
        raise InvalidRequestError(
            "prompt",
            f"has {len(token_ids)} tokens; the model's context is {max_model_len} "
            "(prompt plus at least one output token)",
        )
    if len(token_ids) + 1 > kv_tokens:
        raise InvalidRequestError("prompt", f"{len(token_ids)} tokens do not fit in the KV cache")
