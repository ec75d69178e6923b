"""Batched sampling: greedy, temperature, top-k, top-p, min_p, per-request seeds, min_tokens, logit_bias,
the repetition / frequency / presence penalties (logits_processors.py), logprobs.

Everything is vectorised over the batch; rows differ only in their parameters. The order is vLLM's:
min_tokens' masked stop tokens, logit_bias, penalties, then greedy argmax or temperature, min_p,
top-k / top-p and the draw. Logprobs are the model's own (before any of these), as vLLM's default.
Random rows sample with the exponential race (argmax of p / q with q ~ Exp(1)), which equals
multinomial sampling and lets a seeded request draw its noise from its own generator, so its output
does not depend on what else is in the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvmesh.libs.engine.guided import mask_logits
from kvmesh.libs.engine.logits_processors import apply_logit_bias, apply_min_p, apply_penalties
from kvmesh.libs.engine.request import Request


class SampleResult(NamedTuple):
    token_ids: list[int]
    # per row: (sampled token's logprob, [(token, logprob) top-n]) or None when not asked for
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SampleResult:
        """logits: float32 [len(reqs), vocab], one row per request."""
        raw = logits
        if any(r.guided is not None for r in reqs):  # guided decoding: one bitmask for the batch
            logits = mask_logits(logits, [r.guided for r in reqs])
        logits = self._processed(logits, reqs)
        params = [r.params for r in reqs]
        greedy = all(p.greedy for p in params)
        tokens = logits.argmax(-1) if greedy else self._sample(logits, reqs)

        token_list = tokens.tolist()
        logprobs: list = [None] * len(reqs)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            lp = torch.log_softmax(raw[want], -1)
            chosen = lp.gather(1, tokens[want].unsqueeze(1)).squeeze(1).tolist()
            top_n = max(params[i].logprobs for i in want)
            top_vals, top_ids = lp.topk(top_n, -1) if top_n else (lp[:, :0], lp[:, :0].long())
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
            for j, i in enumerate(want):
                n = params[i].logprobs
                logprobs[i] = (chosen[j], list(zip(top_ids[j][:n], top_vals[j][:n], strict=True)))
        return SampleResult(token_list, logprobs)

    def _processed(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """The logits with min_tokens, logit_bias and the penalties applied: a copy, or `logits` itself
        when no row asks for any of them."""
        held_stops = [
            i for i, r in enumerate(reqs) if r.num_output_tokens < r.params.min_tokens and r.stop_token_ids
        ]
        bias = any(r.params.logit_bias for r in reqs)
        penalties = any(r.params.has_penalties for r in reqs)
        if not (held_stops or bias or penalties):
            return logits
        logits = logits.clone()
        for i in held_stops:
            logits[i, list(reqs[i].stop_token_ids)] = float("-inf")
        if bias:
            apply_logit_bias(logits, reqs)
        if penalties:
            apply_penalties(logits, reqs)
        return logits

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        params = [r.params for r in reqs]
        greedy_rows = torch.tensor([p.greedy for p in params])
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params]).unsqueeze(1)
        scaled = logits / temps
        min_ps = [p.min_p for p in params]
        if any(min_ps):
            scaled = apply_min_p(scaled, torch.tensor(min_ps))
        top_ks = [p.top_k if p.top_k > 0 else self.vocab_size for p in params]
        top_ps = [p.top_p for p in params]
        if any(k < self.vocab_size for k in top_ks) or any(p < 1.0 for p in top_ps):
            scaled = _apply_top_k_top_p(scaled, torch.tensor(top_ks), torch.tensor(top_ps))
        probs = torch.softmax(scaled, -1)
        noise = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(reqs) if r.generator is not None]
        if len(seeded) < len(reqs):
            noise.exponential_()
        for i in seeded:
            req = reqs[i]
            if req.num_output_tokens == 0 and req.params.resumed_tokens:  # true once per request
                skip_draws(req.generator, req.params.resumed_tokens, noise.shape[1])
            noise[i].exponential_(generator=req.generator)
        sampled = (probs / noise).argmax(-1)
        return torch.where(greedy_rows, logits.argmax(-1), sampled)


def skip_draws(generator: torch.Generator, num_tokens: int, vocab: int, rows: int = 64) -> None:
    """Advance a seeded generator past the noise of `num_tokens` earlier samples (one row of `vocab`
    Exp(1) draws each, as in _sample), so that a resumed request samples what it would have sampled
    without the interruption. Costs about 1.7 ms per token on one core (rows at a time bound memory)."""
    while num_tokens > 0:
        n = min(rows, num_tokens)
        torch.empty(n, vocab).exponential_(generator=generator)
        num_tokens -= n


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask everything outside each row's top-k and its top-p nucleus with -inf."""
    sorted_logits, order = logits.sort(-1, descending=True)
    ranks = torch.arange(logits.shape[1]).unsqueeze(0)
    mask = ranks >= top_k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    probs = torch.softmax(sorted_logits, -1)
    # drop a token when the tokens ranked above it already hold top_p of the mass (the first stays)
    mass_before = probs.cumsum(-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
