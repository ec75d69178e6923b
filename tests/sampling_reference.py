"""Pure-Python references of vLLM's sampling adjustments, one token at a time, and a greedy decoder
that applies them to transformers' logits: the oracles of the sampler tests (tests/engine) and of the
mesh's penalties (tests/mesh). No kvmesh code."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any


def ref_penalties(
    row: list[float],
    prompt: list[int],
    output: list[int],
    repetition: float = 1.0,
    frequency: float = 0.0,
    presence: float = 0.0,
) -> list[float]:
    """vLLM: a token in the prompt or the output has a positive logit divided by `repetition`, a
    negative one multiplied; then logit -= frequency * count in the output + presence * (count > 0)."""
    seen = set(prompt) | set(output)
    counts = Counter(output)
    out = []
    for token, x in enumerate(row):
        if token in seen:
            x = x / repetition if x > 0 else x * repetition
        count = counts[token]
        x -= frequency * count + presence * (1 if count else 0)
        out.append(x)
    return out


def ref_min_p(row: list[float], min_p: float) -> list[float]:
    """vLLM: tokens whose probability is below min_p x the most likely token's are dropped (-inf)."""
    top = max(row)
    weights = [math.exp(x - top) for x in row]
    total = sum(weights)
    probs = [w / total for w in weights]
    return [x if q >= min_p * max(probs) else -math.inf for x, q in zip(row, probs, strict=True)]


def penalized_greedy(model: Any, prompt: list[int], max_tokens: int, **penalties: float) -> list[int]:
    """transformers' greedy generate() with ref_penalties applied to each step's logits."""
    import torch

    def penalize(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        output = input_ids[0, len(prompt) :].tolist()
        return torch.tensor([ref_penalties(scores[0].tolist(), prompt, output, **penalties)])

    inputs = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_tokens,
            do_sample=False,
            logits_processor=[penalize],
        )
    return out[0, len(prompt) :].tolist()
