"""From a generate request on the wire to the engine's request, and back: sampling parameters, the
scheduler's rank, the grammar compiled off the engine thread, refusals and token chunks."""

from __future__ import annotations

import asyncio

from kvmesh.libs.engine.async_engine import StreamingLLM
from kvmesh.libs.engine.outputs import RequestOutput
from kvmesh.libs.engine.sampling_params import GrammarSpec, InvalidRequestError, SamplingParams
from kvmesh.schemas.messages import ErrorReply, GenerateRequest, TokenChunk, TokenLogprobs


def to_params(req: GenerateRequest) -> SamplingParams:
    s = req.sampling
    return SamplingParams(
        max_tokens=s.max_tokens,
        min_tokens=s.min_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed,
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
        frequency_penalty=s.frequency_penalty,
        presence_penalty=s.presence_penalty,
        repetition_penalty=s.repetition_penalty,
        logit_bias=dict(s.logit_bias) or None,
        min_p=s.min_p,
        resumed_tokens=s.resumed_tokens,
        guided=None if s.guided is None else GrammarSpec(s.guided.kind, s.guided.value, s.guided.field),
    )


def grammar_is_cold(llm: StreamingLLM, params: SamplingParams) -> bool:
    """A guided request while this worker's grammar compiler is not loaded yet (its first one)."""
    engine = getattr(llm, "engine", None)
    return params.guided is not None and engine is not None and not engine.grammars_loaded


async def compile_grammar(llm: StreamingLLM, params: SamplingParams) -> None:
    """Compile a guided request's grammar off the engine thread (cached by spec: a repeated schema
    costs a lookup), so the engine only builds its matcher. Raises InvalidRequestError."""
    engine = getattr(llm, "engine", None)
    if params.guided is not None and engine is not None:
        await asyncio.to_thread(lambda: engine.grammars.compile(params.guided))


def refusal(exc: InvalidRequestError) -> ErrorReply:
    code = "prompt_too_long" if "context" in str(exc) or "do not fit" in str(exc) else "invalid_request"
    return ErrorReply(code=code, message=str(exc), field=exc.field)


def chunk(out: RequestOutput) -> TokenChunk:
    lps = None
    if out.new_logprobs is not None:
        lps = [
            TokenLogprobs(
                logprob=lp.logprob, top_ids=[t for t, _ in lp.top], top_logprobs=[v for _, v in lp.top]
            )
            for lp in out.new_logprobs
        ]
    first = out.num_output_tokens - len(out.new_token_ids)
    return TokenChunk(token_ids=out.new_token_ids, first_index=first, logprobs=lps)


def rank_of(req: GenerateRequest) -> tuple[int, int]:
    """The engine scheduler's order for a request: its band, then its tenant's load class at dispatch
    (log2 of the tenant's requests in flight, rounded up: 0, 1, 2-3, 4-7, ...). A newcomer (class 0)
    goes ahead of a burst (class 6 for 32-63 in flight), while one tenant's own requests, whose counts
    differ by a few, share a class and keep their arrival order."""
    return (req.priority, req.tenant_inflight.bit_length())
