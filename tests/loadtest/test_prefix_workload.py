"""prefix_bench's workload trace and its summaries (pure logic)."""

import itertools

from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, hash_seed
from kvmesh.loadtest.prefix_clients import Record
from kvmesh.loadtest.prefix_report import compare, summarize_window
from kvmesh.loadtest.prefix_workload import WorkloadSpec, build_trace

SPEC = WorkloadSpec(groups=3, system_tokens=64, users_per_group=2, user_tokens=16, question_tokens=8,
                    rates=(20.0, 40.0), step_s=5.0)  # fmt: skip


def test_the_trace_is_deterministic_with_shared_prefixes_hashes_and_ideal_hits():
    trace = build_trace(SPEC)
    assert trace == build_trace(SPEC), "the same seed gives the same trace"
    assert 100 < sum(r.step == 0 for r in trace) < 200 and 100 < sum(r.step == 1 for r in trace) < 300
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(trace))
    assert all(r.step * 5.0 <= r.arrival_s < (r.step + 1) * 5.0 for r in trace)
    extra, seed = encode_extra_keys(SPEC.model), hash_seed(None)
    seen_groups, seen_users = set(), set()
    for r in trace:
        assert len(r.token_ids) == SPEC.prompt_tokens == 88
        assert r.block_hashes == hash_blocks(r.token_ids, 16, extra, seed)
        expect = 80 if (r.group, r.user) in seen_users else 64 if r.group in seen_groups else 0
        assert r.ideal_cached_tokens == expect
        seen_groups.add(r.group)
        seen_users.add((r.group, r.user))
    same_group = [r for r in trace if r.group == trace[0].group]
    assert all(r.token_ids[:64] == trace[0].token_ids[:64] for r in same_group)
    assert len({tuple(r.token_ids[80:]) for r in trace}) == len(trace), "every question is fresh"


def test_window_summary_counts_censored_requests_and_compares_hits_to_the_oracle():
    def rec(i, arrival, ttft, cached, finish=None, error=None):
        return Record(i, 0, arrival, 100, 50, ttft_s=ttft, cached_tokens=cached, finish_s=finish, error=error)

    records = [
        rec(0, 0.0, 0.5, 80, finish=1.0),
        rec(1, 1.0, 1.0, 0, finish=2.5),
        rec(2, 2.0, None, 0),  # cut off at 10 s before its first token: waited >= 8 s
        rec(3, 3.0, None, 0, error="boom"),
        rec(4, 12.0, 0.1, 100, finish=12.2),  # outside the window
    ]
    s = summarize_window(records, 0.0, 10.0, speedup=1.0, cutoff_s=10.0, health=((0, 0), (80, 160)))
    assert (s["requests"], s["completed"], s["censored"], s["errors"]) == (4, 2, 1, 1)
    assert s["ttft_s"]["p50"] == 1.0 and s["ttft_s"]["p90"] > 5.0
    assert s["hit_rate"] == 0.2 and s["ideal_hit_rate"] == 0.5
    assert (s["oracle_hit_rate"], s["hit_vs_oracle"], s["router_hit_vs_oracle"]) == (0.4, 0.5, 0.5)
    slow = summarize_window(records, 0.0, 20.0, speedup=2.0, cutoff_s=10.0, health=None)
    assert slow["ttft_s"]["p50"] == 2.0, "model time = wall time x speedup"

    kv = {"steps": [{"ttft_s": {"p90": 0.5}, "hit_rate": 0.9, "hit_vs_oracle": 0.96}], "overall": {}}
    rr = {"steps": [{"ttft_s": {"p90": 11.0}, "hit_rate": 0.1}], "overall": {}}
    c = compare({"kv": kv, "round-robin": rr})
    assert c["ttft_p90_round-robin_over_kv"] == 22.0 and c["target_ttft_20x_met"]
    assert c["target_hit_95pct_of_oracle_met"]
