"""Few distinct tensor shapes per forward step, as GPU engines do for CUDA graphs.

On CPUs every distinct shape of a oneDNN op (the bf16 linears, the lm head, the batched decode
attention matmuls) creates primitives that oneDNN's and PyTorch/ideep's caches keep (1024 entries
each by default; libs/allocator_env.py bounds them in the worker). Measured here: 2.3 MiB per token
count across a layer's four linears, 0.65 MiB per lm-head row count, 1.3 MiB per decode (batch,
context) pair. Unbucketed, a worker meets a new shape almost every step (token counts 1..budget,
context widths 1..max blocks) and its RSS climbed by ~200 MiB/min under varied batches. Rounding each
dimension up to a bucket bounds the set of shapes a worker can meet (with the defaults and a 512-token
budget: 56 token counts instead of 512), so memory settles once the buckets in use are warm.
Prefill chunks keep their exact shapes: SDPA's CPU kernel keeps nothing per shape.

A bucket keeps `bits` significant bits below the leading one: with bits=3 every count below 16 is
exact, then 16, 18, .., 32, 36, .. (padding < 1/8, ~1/16 on average); bits=2 gives 1..8, 10, 12, 14,
16, 20, ... Padding costs compute: the token rows pad every linear, the decode batch and context pad
the attention matmuls and softmax (not the gather: attention.DecodeGather copies no padding). With
these defaults the padding added 0.7-3 % rows and 7-15 % decode attention area on the engine's
benchmark workloads, 1-5 % of throughput on the torch decode path, within the noise with the C++
decode kernel (which needs no decode buckets; loadtest/step_shapes_bench.py).
"""

from __future__ import annotations

from dataclasses import dataclass


def bucket(n: int, bits: int | None) -> int:
    """`n` rounded up to the next value with at most `bits` significant bits after the leading one
    (None: `n` itself)."""
    if bits is None or n <= 1:
        return n
    step = 1 << max(0, n.bit_length() - 1 - bits)
    return -(-n // step) * step


@dataclass(frozen=True, slots=True)
class StepBuckets:
    """Bucket resolution (`bits`, see `bucket`) of each step dimension; None leaves it exact."""

    tokens: int | None = 3  # rows of the step's flat batch: every linear, norm and RoPE
    logit_rows: int | None = 2  # rows through the lm head
    decode_seqs: int | None = 2  # sequences in the batched decode attention
    decode_blocks: int | None = 2  # KV blocks each decode sequence's gathered context is padded to

    @classmethod
    def exact(cls) -> StepBuckets:
        """No padding anywhere: the shapes of the step itself."""
        return cls(None, None, None, None)
