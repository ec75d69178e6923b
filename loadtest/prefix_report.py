"""Summaries, comparisons and the figure of prefix_bench.py.

Every time here is model time: a simulated fleet running at `speedup` s reports wall times x s, so
runs at different speedups compare (a real mesh has speedup 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvmesh.loadtest.load_report import percentile
from kvmesh.loadtest.prefix_clients import Record

SCORER_COLORS = {"kv": "tab:green", "round-robin": "tab:red", "random": "tab:orange", "load": "tab:blue"}


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    v = sorted(values)
    return {f"p{q}": round(percentile(v, q), 4) for q in (50, 90, 99)}


def summarize_window(
    records: list[Record], start_s: float, end_s: float, speedup: float, cutoff_s: float, health: tuple | None
) -> dict[str, Any]:
    """Requests that arrived in [start_s, end_s) (model time): latency, throughput, prefix hits.
    `health`: the router's (hit, available) prompt-token counters at the window's two ends."""
    arrived = [r for r in records if start_s <= r.arrival_s * speedup < end_s]
    ok = [r for r in arrived if r.error is None and r.ttft_s is not None]
    censored = [r for r in arrived if r.error is None and r.ttft_s is None]
    # a request cut off before its first token waited at least until the cut-off: a lower bound
    ttft = [r.ttft_s * speedup for r in ok] + [(cutoff_s - r.arrival_s) * speedup for r in censored]
    done = [r for r in records if r.finish_s is not None and start_s <= r.finish_s * speedup < end_s]
    window = end_s - start_s
    prompt = sum(r.prompt_tokens for r in arrived) or 1
    out: dict[str, Any] = {
        "offered_rate": round(len(arrived) / window, 3),
        "requests": len(arrived),
        "completed": sum(r.finish_s is not None for r in ok),
        "censored": len(censored),
        "errors": sum(r.error is not None for r in arrived),
        "first_errors": list(dict.fromkeys(r.error for r in arrived if r.error is not None))[:3],
        "ttft_s": _pcts(ttft),
        "throughput_req_s": round(len(done) / window, 3),
        "output_tok_s": round(sum(r.output_tokens for r in done) / window, 1),
        "hit_rate": round(sum(r.cached_tokens for r in arrived) / prompt, 4),  # what the workers reused
        "ideal_hit_rate": round(sum(r.ideal_cached_tokens for r in arrived) / prompt, 4),  # infinite cache
    }
    if health is not None:
        (hit0, avail0), (hit1, avail1) = health
        out["router_hit_rate"] = round((hit1 - hit0) / prompt, 4)  # on the chosen worker, per the index
        out["oracle_hit_rate"] = round((avail1 - avail0) / prompt, 4)  # best holder at decision time
        oracle = avail1 - avail0
        out["hit_vs_oracle"] = round(sum(r.cached_tokens for r in arrived) / oracle, 4) if oracle else None
        out["router_hit_vs_oracle"] = round((hit1 - hit0) / oracle, 4) if oracle else None
    return out


def summarize_run(
    records: list[Record], step_s: float, num_steps: int, speedup: float, cutoff_s: float, health: list
) -> dict[str, Any]:
    steps = []
    for k in range(num_steps):
        h = (health[k], health[k + 1]) if len(health) > k + 1 else None
        steps.append(summarize_window(records, k * step_s, (k + 1) * step_s, speedup, cutoff_s, h))
    whole = (health[0], health[-1]) if len(health) >= 2 else None
    overall = summarize_window(records, 0.0, num_steps * step_s, speedup, cutoff_s, whole)
    routes = [r.route_s for r in records if r.route_s is not None]
    overall["route_rtt_ms_under_load"] = {k: v * 1e3 if v else v for k, v in _pcts(routes).items()}
    return {"steps": steps, "overall": overall}


def compare(runs: dict[str, dict]) -> dict[str, Any]:
    """KV-aware against the baselines at saturation (the last, highest-rate step)."""
    kv = runs.get("kv")
    if kv is None:
        return {}
    last = kv["steps"][-1]
    out: dict[str, Any] = {
        "kv_ttft_p90_s": last["ttft_s"]["p90"],
        "kv_hit_vs_oracle": last.get("hit_vs_oracle"),
        "kv_hit_vs_oracle_overall": kv["overall"].get("hit_vs_oracle"),
        "kv_router_hit_vs_oracle": last.get("router_hit_vs_oracle"),
    }
    for name in ("round-robin", "random"):
        if name in runs and last["ttft_s"]["p90"]:
            other = runs[name]["steps"][-1]
            out[f"{name}_ttft_p90_s"] = other["ttft_s"]["p90"]
            out[f"ttft_p90_{name}_over_kv"] = round(other["ttft_s"]["p90"] / last["ttft_s"]["p90"], 2)
            out[f"{name}_hit_rate"] = other["hit_rate"]
    out["kv_hit_rate"] = last["hit_rate"]
    ratio = out.get("ttft_p90_round-robin_over_kv")
    out["target_ttft_20x_met"] = ratio is not None and ratio >= 20
    hv = out["kv_hit_vs_oracle"]
    out["target_hit_95pct_of_oracle_met"] = hv is not None and hv >= 0.95
    return out


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    configs = [c for c in result["configs"] if result["configs"][c].get("runs")]
    fig = Figure(figsize=(15, 4.2 * max(1, len(configs))), layout="constrained")
    axes = fig.subplots(max(1, len(configs)), 3, squeeze=False)
    for row, name in zip(axes, configs, strict=False):
        cfg = result["configs"][name]
        for scorer, run in cfg["runs"].items():
            rates = [s["offered_rate"] for s in run["steps"]]
            color = SCORER_COLORS.get(scorer)
            row[0].plot(rates, [s["ttft_s"]["p90"] for s in run["steps"]], "o-", color=color, label=scorer)
            row[0].plot(rates, [s["ttft_s"]["p50"] for s in run["steps"]], "x:", color=color)
            row[1].plot(
                rates, [s["hit_rate"] for s in run["steps"]], "o-", color=color, label=f"{scorer} achieved"
            )
            if run["steps"] and "oracle_hit_rate" in run["steps"][0]:
                row[1].plot(
                    rates, [s["oracle_hit_rate"] for s in run["steps"]], "s--", color=color, alpha=0.5,
                    label=f"{scorer} oracle",
                )  # fmt: skip
            row[2].plot(rates, [s["throughput_req_s"] for s in run["steps"]], "o-", color=color, label=scorer)
        row[0].set(
            title=f"{name}: TTFT p90 (o) / p50 (x)", xlabel="offered req/s", ylabel="s (log)", yscale="log"
        )
        row[1].set(
            title=f"{name}: prefix hit rate vs oracle", xlabel="offered req/s", ylabel="cached / prompt"
        )
        row[2].set(title=f"{name}: completed req/s", xlabel="offered req/s", ylabel="req/s")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("prefix_bench: KV-aware vs round-robin vs random routing (model time)")
    fig.savefig(path, dpi=90)
