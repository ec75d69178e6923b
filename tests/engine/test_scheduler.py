"""Scheduler and pool invariants on a tiny random model: every step, randomized traffic."""

import random

import pytest

from kvmesh.libs.engine.config import EngineConfig
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.libs.engine.sampling_params import SamplingParams


def make_engine(path, **kw) -> LLMEngine:
    cfg = dict(model=str(path), dtype="float32", block_size=4, num_kv_blocks=24, max_num_batched_tokens=16)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), load_tokenizer=False)


def test_randomized_traffic_keeps_pool_integrity(tiny_model_path):
    rng = random.Random(1)
    engine = make_engine(tiny_model_path)
    shared = [rng.randrange(3, 500) for _ in range(12)]
    live: set[str] = set()
    finished = 0
    for i in range(60):
        prefix = shared if rng.random() < 0.6 else []
        prompt = prefix + [rng.randrange(3, 500) for _ in range(rng.randint(1, 20))]
        params = SamplingParams(
            max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.8]), ignore_eos=True
        )
        engine.add_request(f"r{i}", prompt, params)
        live.add(f"r{i}")
        for _ in range(rng.randint(0, 3)):
            for out in engine.step():
                if out.finished:
                    live.discard(out.request_id)
                    finished += 1
            engine.check_integrity()
        if live and rng.random() < 0.15:
            victim = rng.choice(sorted(live))
            assert engine.abort_request(victim)
            engine.check_integrity()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
                finished += 1
        engine.check_integrity()
    assert not live and finished == 60
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks, "every block returns to the pool"
    assert stats.num_preemptions > 0, "the cache was meant to be small enough to force preemption"
    assert stats.prefix_hit_tokens > 0, "shared prefixes were meant to hit the prefix cache"


def test_abort_returns_blocks_at_once(tiny_model_path):
    engine = make_engine(tiny_model_path)
    engine.add_request("a", list(range(3, 30)), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats().num_free_blocks < engine.stats().num_blocks
    assert engine.abort_request("a")
    engine.check_integrity()
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "abort"
    assert not engine.abort_request("a"), "aborting twice is a no-op"


def test_chunked_prefill_equals_one_shot(tiny_model_path):
    prompt = [(7 * i) % 500 + 3 for i in range(45)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = []
    for budget in (8, 512):
        engine = make_engine(tiny_model_path, max_num_batched_tokens=budget, num_kv_blocks=64)
        engine.add_request("x", prompt, params)
        tokens = []
        steps = 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                tokens += o.new_token_ids
            steps += 1
        outs.append((tokens, steps))
    assert outs[0][0] == outs[1][0]
    assert outs[0][1] > outs[1][1], "the small budget must have split the prompt into chunks"


def test_chunked_prefill_off_rejects_nothing_but_waits(tiny_model_path):
    engine = make_engine(
        tiny_model_path, enable_chunked_prefill=False, max_num_batched_tokens=16, num_kv_blocks=64
    )
    engine.add_request("short", [5] * 8, SamplingParams(max_tokens=2, ignore_eos=True))
    engine.add_request("long", [6] * 12, SamplingParams(max_tokens=2, ignore_eos=True))
    first = engine.scheduler.schedule()
    assert [s.request.request_id for s in first.prefills] == ["short"], (
        "long does not fit the rest of the budget"
    )


@pytest.mark.parametrize("blocks", [1, 3])
def test_prompt_larger_than_cache_is_refused(tiny_model_path, blocks):
    engine = make_engine(tiny_model_path, num_kv_blocks=blocks)
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("big", list(range(3, 3 + 4 * blocks + 1)), SamplingParams())
