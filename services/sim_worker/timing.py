"""The simulated worker's timing model: how long one engine step of a given shape takes.

Calibrated from the real engine on this machine (loadtest/calibrate_sim.py writes the profile, the
committed default is `default_profile.json`). One step of the real engine is one model forward over
a flat batch of tokens, so its cost is modelled per step, from what the scheduler put in it:

    step = base(B) + prefill_s_per_token * P + prefill_s_per_token_ctx * sum(n_i * c_i)
                   + decode_s_per_ctx_token * sum(c_j - decode_ref_context)

- B decoding requests: base(B) is the measured decode-step time at batch B (interpolated; linear
  beyond the last point), measured at context `decode_ref_context`; a step without decodes costs
  `prefill_base_s` (the fixed cost of a forward: launch, sampling, bookkeeping).
- P prefill tokens in chunks n_i over c_i already-computed tokens: the linear (MLP, projections) cost
  per token, plus attention over the cached context, which grows with n_i * c_i.
- decoding requests with longer contexts than the reference read more KV: a cost per extra token.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from pathlib import Path

import msgspec

DEFAULT_PROFILE = Path(__file__).resolve().parent / "default_profile.json"


class TimingProfile(msgspec.Struct, frozen=True, kw_only=True):
    """Measured step costs of one model on one machine (seconds). `meta` says what was measured."""

    prefill_base_s: float
    prefill_s_per_token: float
    prefill_s_per_token_ctx: float = 0.0
    decode_batch_sizes: list[int]
    decode_step_s: list[float]
    decode_ref_context: int = 0
    decode_s_per_ctx_token: float = 0.0
    meta: dict = {}

    def __post_init__(self) -> None:
        sizes = self.decode_batch_sizes
        if not sizes or len(sizes) != len(self.decode_step_s):
            raise ValueError("decode_batch_sizes and decode_step_s must be non-empty and equally long")
        if any(b <= a for a, b in itertools.pairwise(sizes)) or sizes[0] < 1:
            raise ValueError("decode_batch_sizes must be increasing and >= 1")

    def decode_base(self, batch: int) -> float:
        """Decode-step time at `batch` requests of the reference context (piecewise linear)."""
        sizes, times = self.decode_batch_sizes, self.decode_step_s
        if len(sizes) == 1:
            return times[0] * batch / sizes[0] if batch > sizes[0] else times[0]
        i = bisect.bisect_left(sizes, batch)
        if i < len(sizes) and sizes[i] == batch:
            return times[i]
        if i == 0:  # below the first point: between the prefill-only base and it
            lo_b, lo_t, hi_b, hi_t = 0, self.prefill_base_s, sizes[0], times[0]
        elif i == len(sizes):  # beyond the last point: extend the last segment
            lo_b, lo_t, hi_b, hi_t = sizes[-2], times[-2], sizes[-1], times[-1]
        else:
            lo_b, lo_t, hi_b, hi_t = sizes[i - 1], times[i - 1], sizes[i], times[i]
        return lo_t + (hi_t - lo_t) * (batch - lo_b) / (hi_b - lo_b)

    def step_time(self, decode_contexts: Sequence[int], prefill_chunks: Sequence[tuple[int, int]]) -> float:
        """Seconds of one step: `decode_contexts` holds each decoding request's context length,
        `prefill_chunks` each prefilling request's (new tokens, already computed tokens)."""
        if not decode_contexts and not prefill_chunks:
            return 0.0
        t = self.decode_base(len(decode_contexts)) if decode_contexts else self.prefill_base_s
        for new, ctx in prefill_chunks:
            t += self.prefill_s_per_token * new + self.prefill_s_per_token_ctx * new * ctx
        if decode_contexts and self.decode_s_per_ctx_token:
            extra = sum(decode_contexts) - self.decode_ref_context * len(decode_contexts)
            t += self.decode_s_per_ctx_token * extra
        return max(t, 0.0)

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=1)


def load_profile(path: str | Path | None = None) -> TimingProfile:
    """The profile at `path`, else the committed default (calibrated on the project machine)."""
    return msgspec.json.decode(Path(path or DEFAULT_PROFILE).read_bytes(), type=TimingProfile)
