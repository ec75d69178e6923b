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


def test_a_better_ranked_newcomer_prefills_ahead_of_running_chunks(tiny_model_path):
    """Ranks order the scheduler (the gateway sends (band, the tenant's requests in flight)): a
    newcomer ranked better than the requests still prefilling takes the step's budget first; they
    get what is left. Equal ranks stay first come, first served."""
    engine = make_engine(tiny_model_path, num_kv_blocks=64, max_num_batched_tokens=16)
    prefills: list[list[tuple[str, int]]] = []
    schedule = engine.scheduler.schedule

    def recorded():
        out = schedule()
        prefills.append([(s.request.request_id, s.num_new_tokens) for s in out.prefills])
        return out

    engine.scheduler.schedule = recorded
    burst = SamplingParams(max_tokens=4, ignore_eos=True)
    for i in range(2):  # tenant A: two 40-token prompts, prefilled 16 tokens a step
        engine.add_request(f"a{i}", list(range(3 + i, 43 + i)), burst, rank=(0, 5 + i))
    engine.step()
    assert prefills[-1] == [("a0", 16)]
    engine.add_request("late-equal", list(range(100, 112)), burst, rank=(0, 6))
    engine.add_request("b", list(range(200, 212)), burst, rank=(0, 0))
    assert [r.request_id for r in engine.scheduler.waiting] == ["b", "a1", "late-equal"]
    engine.step()
    # b's 12 tokens first; a0's next chunk gets the 4 left; a1 and late-equal wait
    assert prefills[-1] == [("b", 12), ("a0", 4)]
    engine.check_integrity()
    while engine.has_unfinished_requests():  # and everything completes
        engine.step()
        engine.check_integrity()


def test_equal_ranks_are_first_come_first_served(tiny_model_path):
    engine = make_engine(tiny_model_path, num_kv_blocks=64, max_num_batched_tokens=16)
    for i in range(3):
        engine.add_request(f"r{i}", list(range(3 + i, 43 + i)), SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    engine.add_request("new", list(range(200, 212)), SamplingParams(max_tokens=2, ignore_eos=True))
    assert [r.request_id for r in engine.scheduler.waiting] == ["r1", "r2", "new"]
    sched = engine.scheduler.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in sched.prefills] == [("r0", 16)]
