"""What the engine hands back: per-step deltas and finished completions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


class RequestTiming(NamedTuple):
    """When a finished request went through the engine (time.monotonic() seconds). queue = scheduled -
    arrival, prefill = first_token - scheduled, decode = finished - first_token (vLLM's phases)."""

    arrival: float  # queued in the engine
    scheduled: float | None  # first scheduled (None: aborted while waiting)
    first_token: float | None  # first output token sampled (None: aborted before)
    finished: float
    num_preemptions: int


@dataclass(slots=True)
class RequestOutput:
    """One step's news for one request: the tokens and text it produced since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    new_logprobs: list[TokenLogprob] | None = None
    # finished with hold_blocks: the request's blocks, still pinned until LLMEngine.release_held()
    held_block_ids: list[int] | None = None
    timing: RequestTiming | None = None  # on the final output only


@dataclass(slots=True)
class CompletionOutput:
    """A finished request, as the offline API returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None

    def add(self, out: RequestOutput) -> None:
        self.token_ids.extend(out.new_token_ids)
        self.text += out.new_text
        self.num_cached_tokens = out.num_cached_tokens
        if out.new_logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.new_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason
