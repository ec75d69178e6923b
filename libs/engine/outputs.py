"""What the engine hands back: per-step deltas and finished completions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from kvmesh.libs.engine.request import Request


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


def request_output(
    req: Request,
    tokens: list[int],
    text: str = "",
    logprobs: list[TokenLogprob] | None = None,
    finished_at: float | None = None,
) -> RequestOutput:
    """`req`'s output for this step; a finished request's carries its timing, finished at
    `finished_at` (default: now)."""
    timing = None
    if req.is_finished:
        timing = RequestTiming(
            arrival=req.arrival_time,
            scheduled=req.first_scheduled_time,
            first_token=req.first_token_time,
            finished=time.monotonic() if finished_at is None else finished_at,
            num_preemptions=req.num_preemptions,
        )
    return RequestOutput(
        request_id=req.request_id,
        new_token_ids=tokens,
        new_text=text,
        finished=req.is_finished,
        finish_reason=req.finish_reason.value if req.finish_reason else None,
        num_prompt_tokens=req.num_prompt_tokens,
        num_output_tokens=req.num_output_tokens,
        num_cached_tokens=max(req.num_cached_tokens, 0),
        new_logprobs=logprobs,
        timing=timing,
    )
