"""Reporting for openai_load: percentiles, the run summary, the JSON + PNG files, the text table."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmesh.loadtest.load_types import LoadResult, RequestRecord


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    k = (len(sorted_values) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def pct_ms(seconds: list[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) of durations given in seconds, in ms; NaN when empty."""
    return percentile(sorted(seconds), q) * 1e3 if seconds else float("nan")


def _stats_ms(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    ms = sorted(v * 1e3 for v in values)
    stats: dict[str, float | int | None] = {"n": len(ms), "mean": round(sum(ms) / len(ms), 3)}
    stats |= {f"p{q}": round(percentile(ms, q), 3) for q in (50, 90, 99)}
    return stats


def _max_in_flight(records: list[RequestRecord]) -> int:
    # At equal times an end (-1) sorts before a start (+1): back-to-back requests never overlap.
    events = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def summarize(records: list[RequestRecord]) -> dict[str, Any]:
    """Latency percentiles (ms) and throughput over the measured window (first start to last end)."""
    ok = [r for r in records if r.error is None]
    failed = sorted((r for r in records if r.error is not None), key=lambda r: r.index)
    window = max(r.end for r in records) - min(r.start for r in records) if records else 0.0
    output_tokens = sum(r.output_tokens for r in ok)
    server_prompt = [r.server_prompt_tokens for r in ok if r.server_prompt_tokens is not None]
    kinds = Counter(str(r.status) if r.status not in (None, 200) else "exception" for r in failed)
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": len(failed),
        "errors_by_kind": dict(kinds),  # HTTP status, or "exception" (no response, or a broken stream)
        "first_errors": list(dict.fromkeys(r.error for r in failed))[:5],
        "duration_s": round(window, 3),
        "request_throughput": len(ok) / window if window > 0 else 0.0,
        "output_tok_s": output_tokens / window if window > 0 else 0.0,
        "output_tokens": output_tokens,
        "short_outputs": sum(r.output_tokens < r.max_tokens for r in ok),  # stopped before max_tokens
        "mean_prompt_tokens": sum(r.prompt_tokens for r in ok) / len(ok) if ok else None,
        "mean_server_prompt_tokens": sum(server_prompt) / len(server_prompt) if server_prompt else None,
        "max_in_flight": _max_in_flight(records),
        "ttft_ms": _stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": _stats_ms([gap for r in ok for gap in r.itl]),
        "tpot_ms": _stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "e2e_ms": _stats_ms([r.e2e for r in ok]),
    }


def write_results(result: LoadResult, path: str | Path) -> Path:
    """Write the JSON to `path` and the plots next to it (same name, .png); returns the PNG's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(result.config, api_key="***" if result.config.api_key else None)
    records = []
    for r in result.records:
        rec = dataclasses.asdict(r)
        rec["itl"] = [round(gap, 6) for gap in r.itl]
        records.append(rec)
    doc = {
        "label": result.config.label,
        "started_at": result.started_at,
        "config": dataclasses.asdict(config),
        "summary": result.summary,
        "warmup_errors": result.warmup_errors,
        "records": records,
    }
    path.write_text(json.dumps(doc, indent=1))
    png = path.with_suffix(".png")
    plot_results(result, png)
    return png


def plot_results(result: LoadResult, png: Path) -> None:
    """TTFT and ITL histograms, latency CDFs and the output tok/s timeline."""
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global state, safe in any thread

    ok = [r for r in result.records if r.error is None]
    series = {
        "TTFT": [r.ttft * 1e3 for r in ok if r.ttft is not None],
        "ITL": [gap * 1e3 for r in ok for gap in r.itl],
        "TPOT": [r.tpot * 1e3 for r in ok if r.tpot is not None],
        "e2e": [r.e2e * 1e3 for r in ok],
    }
    fig = Figure(figsize=(13, 8.5), layout="constrained")
    (ax_ttft, ax_itl), (ax_cdf, ax_time) = fig.subplots(2, 2)
    for ax, name in ((ax_ttft, "TTFT"), (ax_itl, "ITL")):
        if series[name]:
            ax.hist(series[name], bins=50, color="tab:blue" if name == "TTFT" else "tab:orange")
        ax.set(title=f"{name} (ms)", xlabel="ms", ylabel="count")
    for name, values in series.items():
        if values:
            values = sorted(values)
            ax_cdf.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
    ax_cdf.set(title="latency CDFs", xlabel="ms (log)", ylabel="fraction", xscale="log")
    ax_cdf.legend()
    ax_cdf.grid(alpha=0.3)
    window = result.summary["duration_s"]
    if ok and window > 0:
        width = 1.0 if window >= 10 else window / 10
        bins = [0.0] * max(1, math.ceil(window / width))
        for r in ok:  # spread each request's tokens over its text chunks (a chunk may hold several)
            chunk_times = [r.start + (r.ttft or 0.0)]
            for gap in r.itl:
                chunk_times.append(chunk_times[-1] + gap)
            for t in chunk_times:
                bins[min(int(t / width), len(bins) - 1)] += r.output_tokens / len(chunk_times)
        ax_time.plot([(i + 0.5) * width for i in range(len(bins))], [b / width for b in bins])
    ax_time.set(title="output tok/s over the run", xlabel="s since start", ylabel="tok/s")
    ax_time.grid(alpha=0.3)
    s, cfg = result.summary, result.config
    fig.suptitle(
        f"{cfg.label or cfg.model} · {cfg.endpoint} · {cfg.mode} · {s['completed']} ok, {s['errors']} errors"
        f" · {s['output_tok_s']:.1f} output tok/s"
    )
    fig.savefig(png, dpi=100)


def format_summary(result: LoadResult) -> str:
    s, cfg = result.summary, result.config
    lines = [
        f"== {cfg.label or 'openai_load'}: {cfg.model} at {cfg.base_url} ({cfg.endpoint}, {cfg.mode}) ==",
        f"requests: {s['completed']} ok, {s['errors']} errors in {s['duration_s']:.2f} s: "
        f"{s['request_throughput']:.2f} req/s, {s['output_tok_s']:.1f} output tok/s "
        f"({s['output_tokens']} tokens, max {s['max_in_flight']} in flight)",
        f"{'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name in ("ttft", "itl", "tpot", "e2e"):
        st = s[f"{name}_ms"]
        cells = "".join(
            f"{st[k]:>10.1f}" if st[k] is not None else f"{'-':>10}" for k in ("mean", "p50", "p90", "p99")
        )
        lines.append(f"{name.upper():<6}{cells}")
    if s["errors"]:
        lines.append(f"errors by kind: {s['errors_by_kind']}")
        lines += [f"  {message}" for message in s["first_errors"]]
    if result.warmup_errors:
        lines.append(f"warm-up errors: {result.warmup_errors[:2]}")
    return "\n".join(lines)
