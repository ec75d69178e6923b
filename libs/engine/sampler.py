"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds, min_tokens, logprobs.

Everything is vectorised over the batch; rows differ only in their parameters. Random rows sample
with the exponential race (argmax of p / q with q ~ Exp(1)), which equals multinomial sampling and
lets a seeded request draw its noise from its own generator, so its output does not depend on what
else is in the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

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
        for i, req in enumerate(reqs):
            if req.num_output_tokens < req.params.min_tokens and req.stop_token_ids:
                if raw is logits:
                    logits = logits.clone()
                logits[i, list(req.stop_token_ids)] = float("-inf")

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

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        params = [r.params for r in reqs]
        greedy_rows = torch.tensor([p.greedy for p in params])
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params]).unsqueeze(1)
        scaled = logits / temps
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
