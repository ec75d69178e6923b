"""The simulated worker's timing model and engine core (pure logic, virtual time)."""

import pytest

from kvmesh.libs.engine.sampling_params import InvalidRequestError, SamplingParams
from kvmesh.schemas.kv_events import BlockRemoved, BlockStored
from kvmesh.services.sim_worker.core import SimCore, SimEngineConfig
from kvmesh.services.sim_worker.timing import TimingProfile, load_profile

PROFILE = TimingProfile(
    prefill_base_s=0.02,
    prefill_s_per_token=0.001,
    prefill_s_per_token_ctx=1e-6,
    decode_batch_sizes=[1, 2, 4, 8],
    decode_step_s=[0.03, 0.04, 0.05, 0.07],
    decode_ref_context=100,
    decode_s_per_ctx_token=1e-5,
)


def test_step_time_adds_prefill_attention_and_decode_costs():
    assert PROFILE.step_time([], []) == 0.0
    # prefill only: the fixed cost, per token, and attention over the cached context
    assert PROFILE.step_time([], [(100, 0)]) == pytest.approx(0.02 + 0.1)
    assert PROFILE.step_time([], [(100, 1000)]) == pytest.approx(0.02 + 0.1 + 100 * 1000 * 1e-6)
    # decode: the measured batch curve, interpolated and extended, plus longer contexts
    assert PROFILE.step_time([100, 100], []) == pytest.approx(0.04)
    assert PROFILE.step_time([100] * 3, []) == pytest.approx(0.045)
    assert PROFILE.step_time([100] * 12, []) == pytest.approx(0.07 + 4 * 0.005)
    assert PROFILE.step_time([300], []) == pytest.approx(0.03 + 200 * 1e-5)
    # a mixed step pays the decode batch's cost, not the prefill base on top
    assert PROFILE.step_time([100], [(50, 0)]) == pytest.approx(0.03 + 0.05)


def test_profile_validation_and_the_committed_default_loads():
    with pytest.raises(ValueError):
        TimingProfile(
            prefill_base_s=0, prefill_s_per_token=0, decode_batch_sizes=[4, 2], decode_step_s=[1, 2]
        )
    default = load_profile()
    assert default.meta["model"] == "SmolLM2-135M-Instruct" and default.prefill_s_per_token > 0
    assert default.step_time([], [(512, 0)]) > default.step_time([], [(16, 0)]) > 0


def run(core: SimCore) -> tuple[dict[str, float], dict[str, object], float]:
    """Step to completion in virtual time: (TTFT per request, final output per request, makespan)."""
    clock, ttft, final = 0.0, {}, {}
    while core.has_unfinished_requests():
        step = core.step()
        clock += step.duration_s
        for out in step.outputs:
            if out.new_token_ids:
                ttft.setdefault(out.request_id, clock)
            if out.finished:
                final[out.request_id] = out
        core.check_integrity()
    return ttft, final, clock


def test_a_repeated_prefix_is_served_from_the_real_prefix_cache_and_costs_less():
    core = SimCore(SimEngineConfig(num_kv_blocks=256, max_num_batched_tokens=512), PROFILE)
    prefix = list(range(1000, 1800))  # 50 blocks
    params = SamplingParams(max_tokens=4, temperature=0)
    core.add_request("a", [*prefix, 1, 2, 3], params)
    ttft_a, final_a, _ = run(core)
    events = core.take_kv_events()
    stored = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
    assert len(stored) == 50 and not [e for e in events if isinstance(e, BlockRemoved)]
    core.add_request("b", [*prefix, 4, 5, 6], params)
    ttft_b, final_b, _ = run(core)
    assert final_a["a"].num_cached_tokens == 0 and final_b["b"].num_cached_tokens == 800
    assert ttft_b["b"] < ttft_a["a"] / 5, "only 3 uncached tokens to prefill"
    assert final_b["b"].timing is not None and final_b["b"].finish_reason == "length"
    stats = core.stats()
    assert (stats.prefix_hit_tokens, stats.prefix_query_tokens) == (800, 1606)


def test_long_prompts_are_chunked_under_the_token_budget_and_decodes_batch():
    core = SimCore(SimEngineConfig(num_kv_blocks=512, max_num_batched_tokens=256), PROFILE)
    core.add_request("long", list(range(2000, 2600)), SamplingParams(max_tokens=2))  # 3 chunks
    steps = [core.step() for _ in range(3)]
    assert [s.num_prefill_tokens for s in steps] == [256, 256, 88]
    assert steps[1].duration_s == pytest.approx(0.02 + 256 * 0.001 + 256 * 256 * 1e-6)
    run(core)
    for i in range(4):
        core.add_request(f"d{i}", [3000 + i] * 20, SamplingParams(max_tokens=5))
    first = core.step()  # four 20-token prompts prefill together
    assert first.num_prefill_tokens == 80 and len(first.outputs) == 4
    second = core.step()
    assert second.num_decodes == 4 and second.duration_s == pytest.approx(0.05 + 4 * (20 - 100) * 1e-5)


def test_outputs_are_deterministic_and_requests_are_validated_like_the_engine():
    def tokens(core: SimCore, rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
        core.add_request(rid, prompt, params)
        out: list[int] = []
        while core.has_unfinished_requests():
            for o in core.step().outputs:
                out += o.new_token_ids
        return out

    cfg = SimEngineConfig(num_kv_blocks=64)
    greedy = SamplingParams(max_tokens=8, temperature=0)
    a = tokens(SimCore(cfg, PROFILE), "x", [5, 6, 7], greedy)
    assert a == tokens(SimCore(cfg, PROFILE), "y", [5, 6, 7], greedy), "greedy: a function of the prompt"
    assert a != tokens(SimCore(cfg, PROFILE), "x", [5, 6, 8], greedy)
    assert len(a) == 8 and all(256 <= t < cfg.vocab_size for t in a)
    core = SimCore(cfg, PROFILE)
    with pytest.raises(InvalidRequestError, match="prompt"):
        core.add_request("bad", [cfg.vocab_size], greedy)
    with pytest.raises(InvalidRequestError, match="do not fit"):
        core.add_request("huge", [7] * (64 * 16 + 1), greedy)
    core.add_request("gone", [1] * 40, greedy)
    assert core.abort_request("gone") and not core.abort_request("gone")
    (out,) = core.step().outputs
    assert out.finished and out.finish_reason == "abort"
    core.check_integrity()
