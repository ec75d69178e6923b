"""The soak's own judgement (pure logic): what counts as flat memory and how outcomes are tallied."""

from types import SimpleNamespace

from kvmesh.loadtest.soak import Record, RssSampler, summarize

MIB = 2**20


def sampler_with(series: dict[str, list[tuple[float, float]]]) -> RssSampler:
    s = RssSampler(SimpleNamespace(procs=[]), every=5)
    s.series = {name: [(t, int(mib * MIB)) for t, mib in pts] for name, pts in series.items()}
    return s


def test_flat_versus_growing_memory():
    flat = [(t, 500 + (t % 10) / 10) for t in range(0, 300, 5)]  # jitter, no trend
    growing = [(t, 500 + t) for t in range(0, 300, 5)]  # 60 MiB per minute
    loading = [(t, 100.0 if t < 50 else 500.0) for t in range(0, 300, 5)]  # before steady_from
    warming = [(t, 500 + min(t, 120)) for t in range(0, 300, 5)]  # caches fill, then a plateau
    slow_leak = [(t, 2000 + t / 3) for t in range(0, 300, 5)]  # 20 MiB per minute on 2 GiB
    series = {"a": flat, "b": growing, "c": loading, "d": warming, "e": slow_leak}
    report = sampler_with(series).report(steady_from=60)
    assert report["a"]["flat"] and abs(report["a"]["slope_mib_per_min"]) < 1
    assert not report["b"]["flat"] and round(report["b"]["slope_mib_per_min"]) == 60
    assert report["c"]["flat"], "samples before steady_from do not count"
    assert report["d"]["flat"] and report["d"]["end_mib"] > report["d"]["start_mib"], "a warm-up is no leak"
    assert not sampler_with({"e": slow_leak}).report(steady_from=0)["e"]["flat"], "a slow climb is caught"
    assert sampler_with({"e": slow_leak}).report(0, killed="e")["e"]["flat"] is None, (
        "a killed life: not judged"
    )


def test_outcomes_are_tallied_and_lost_ones_listed():
    records = [Record(i, "overload", start=float(i), end=i + 2.0, outcome=o) for i, o in enumerate(
        ["ok", "ok", "rejected", "disconnected", "lost"]
    )]  # fmt: skip
    records[2].status = 429
    summary = summarize(records)
    assert (summary["ok"], summary["rejected"], summary["disconnected"], summary["lost"]) == (2, 1, 1, 1)
    assert summary["rejected_by_status"] == {"429": 1, "503": 0}
    assert [r["index"] for r in summary["lost_examples"]] == [4]
