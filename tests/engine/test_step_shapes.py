"""Step-shape bucketing: the bucket arithmetic, and a padded step giving the logits of the unpadded one
on the real model (float32)."""

import pytest
import torch

from kvmesh.libs.engine.config import EngineConfig
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.libs.engine.model_runner import ModelRunner
from kvmesh.libs.engine.sampling_params import SamplingParams
from kvmesh.libs.engine.step_shapes import StepBuckets, bucket


@pytest.mark.parametrize("bits", [0, 1, 2, 3])
def test_buckets_cover_every_count_with_bounded_padding(bits):
    values = [bucket(n, bits) for n in range(1, 513)]
    assert all(b >= n for n, b in zip(range(1, 513), values, strict=True))
    assert values == sorted(values)
    assert all(bucket(b, bits) == b for b in values), "a bucket is its own bucket"
    assert all((b - n) / n < 2**-bits for n, b in zip(range(1, 513), values, strict=True))
    assert [n for n in range(1, 513) if bucket(n, bits) == n][: 2 << bits] == list(range(1, (2 << bits) + 1))
    # few shapes: 2^(bits+1) exact counts, then 2^bits per octave up to 512
    assert len(set(values)) == (2 << bits) + (8 - bits) * (1 << bits)
    assert bucket(7, None) == 7


@pytest.fixture(scope="module")
def mixed_step(default_model_path):
    """An engine (float32, the real model) and one mixed step: 9 decodes over 9-block contexts (prompts
    of 128-138 tokens plus a few outputs) and two
    fresh prefills (14 and 20 tokens), scheduled but not run."""
    cfg = EngineConfig(model=str(default_model_path), dtype="float32", num_kv_blocks=128)
    engine = LLMEngine(cfg, load_tokenizer=False)
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(100, engine.model.cfg.vocab_size, (n,), generator=gen).tolist()

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for i, n in enumerate([130, 135, 138, 128, 136, 131, 137, 129, 133]):
        engine.add_request(f"d{i}", prompt(n), params)
    while any(r.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()
    engine.add_request("p0", prompt(14), params)
    engine.add_request("p1", prompt(20), params)
    sched = engine.scheduler.schedule()
    assert (len(sched.decodes), len(sched.prefills)) == (9, 2)
    return engine, sched


def run_step(
    engine: LLMEngine, sched, buckets: StepBuckets, kernel: bool = False
) -> tuple[torch.Tensor, tuple]:
    """The step's logits (real rows only) and its shapes: token rows, decode sequences, decode
    context (the torch path's; None through the CPU kernel), lm head rows. Rerunning a step rewrites
    the same cache slots: the cache is unchanged."""
    runner = ModelRunner(engine.model, engine.kv_cache, engine.config.block_size, buckets, kernel)
    assert runner.decode_kernel == kernel, "the CPU kernel is part of the install: it must build"
    ids, pos, meta, rows = runner.build(sched)
    with torch.inference_mode():
        hidden = engine.model.forward(ids, pos, engine.kv_cache, meta)
        logits = engine.model.compute_logits(hidden[rows])[:11]
    bias = meta.decode_bias
    decode = (bias.shape[1], bias.shape[3]) if bias is not None else (None, None)
    return logits, (ids.shape[0], *decode, len(rows))


@pytest.mark.parametrize(
    ("buckets", "padded"),
    [(StepBuckets(), (44, 10, 10 * 16, 12)), (StepBuckets(0, 0, 0, 0), (64, 16, 16 * 16, 16))],
    ids=["default", "powers-of-two"],
)
def test_padded_step_gives_the_unpadded_logits(mixed_step, buckets, padded):
    """The same step through an exact runner and a bucketed one: every dimension padded (token rows
    43, decode batch 9 x 9 blocks, lm head rows 11), the same logits within float32 noise."""
    engine, sched = mixed_step
    want, exact_shape = run_step(engine, sched, StepBuckets.exact())
    got, padded_shape = run_step(engine, sched, buckets)
    assert exact_shape == (43, 9, 9 * 16, 11)
    assert padded_shape == padded
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_the_cpu_kernel_step_gives_the_torch_paths_logits(mixed_step):
    """The same mixed step with its 9 decode rows through the C++ kernel (reading the blocks in
    place) and through the exact torch path (gather + matmuls): the same logits within float32 noise,
    the same greedy tokens."""
    engine, sched = mixed_step
    want, _ = run_step(engine, sched, StepBuckets.exact())
    got, shape = run_step(engine, sched, StepBuckets(), kernel=True)
    assert shape == (44, None, None, 12)  # token rows and lm head rows still bucketed
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
