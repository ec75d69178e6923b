"""The router's decision latency, measured by prefix_bench.py against a live stack: routing
requests' round trips as the gateway sees them, and the router's own histogram from /metrics.
"""

from __future__ import annotations

import os
import time
import urllib.request


async def decision_latency(nats_url: str, trace, metrics_port: int, n: int = 400) -> dict:
    """Sequential routing requests with the trace's 128-block prompts against the live router
    (256 workers, a warm index): round trip as the gateway sees it, and the router's own histogram
    of decision time (index lookup included) over these probes. For the breakdown, interleaved
    with them: the kv-index's overlap query alone, and a request answered from memory (a simulated
    worker's stats: the cost of a NATS round trip between two processes on this machine)."""
    from kvmesh.libs.bus import Bus
    from kvmesh.loadtest.load_report import pct_ms
    from kvmesh.schemas.messages import (
        OverlapRequest,
        OverlapResult,
        RouteReply,
        RouteRequest,
        RouteResult,
        StatsRequest,
        Subjects,
        WorkerStats,
    )

    bus = await Bus.connect(nats_url, "prefix-bench-latency")
    before = scrape_decision_buckets(metrics_port)
    rtts: dict[str, list[float]] = {"route": [], "overlap": [], "stats": []}
    blocks = set()

    async def timed(kind: str, subject: str, msg, reply_type):
        t = time.perf_counter()
        reply = await bus.request(subject, msg, reply_type, timeout=5)
        rtts[kind].append(time.perf_counter() - t)
        return reply

    for i in range(n):
        r = trace[i % len(trace)]
        req = RouteRequest(
            request_id=f"probe-{i}", num_tokens=len(r.token_ids), max_tokens=16, block_hashes=r.block_hashes
        )
        reply = await timed("route", Subjects.ROUTER_ROUTE, req, RouteResult)
        assert isinstance(reply, RouteReply), reply
        await timed(
            "overlap", Subjects.KV_INDEX_OVERLAP, OverlapRequest(block_hashes=r.block_hashes), OverlapResult
        )
        await timed("stats", Subjects.worker("sim-0", "stats"), StatsRequest(), WorkerStats)
        blocks.add(len(r.block_hashes))
    await bus.close()
    out: dict = {"probes": n, "prompt_blocks": sorted(blocks)}
    for kind, values in rtts.items():
        out[f"{kind}_rtt_ms"] = {f"p{q}": round(pct_ms(values, q), 3) for q in (50, 90, 99)}
    out["router_histogram"] = scrape_decision_histogram(metrics_port)
    out["router_histogram_probes_ms"] = histogram_quantiles_ms(before, scrape_decision_buckets(metrics_port))
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return out


def scrape_decision_histogram(port: int) -> dict:
    """kvmesh:router_decision_seconds from the router's /metrics: the share of decisions within each
    bucket bound (cumulative), over every decision since the router started."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError as exc:
        return {"error": repr(exc)}
    buckets, count = {}, 0.0
    for line in text.splitlines():
        if line.startswith("kvmesh:router_decision_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("kvmesh:router_decision_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])
    if not count:
        return {"decisions": 0}
    share = {
        f"le_{le}s": round(v / count, 5) for le, v in buckets.items() if le in ("0.001", "0.002", "0.005")
    }
    return {"decisions": int(count), **share}


def scrape_decision_buckets(port: int) -> dict[float, float]:
    """The cumulative buckets of kvmesh:router_decision_seconds now: upper bound (s) -> count."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("kvmesh:router_decision_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def histogram_quantiles_ms(before: dict[float, float], after: dict[float, float]) -> dict:
    """p50/p90/p99 of the decisions observed between two scrapes, interpolated linearly within
    buckets (as Prometheus' histogram_quantile), and the share of them within 1 and 2 ms."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if not total:
        return {"decisions": 0}
    out: dict = {"decisions": int(total)}
    for q in (50, 90, 99):
        rank = total * q / 100
        i = next(k for k, c in enumerate(counts) if c >= rank)
        lo, below = (bounds[i - 1], counts[i - 1]) if i else (0.0, 0.0)
        hi = bounds[i] if bounds[i] != float("inf") else lo
        frac = (rank - below) / (counts[i] - below) if counts[i] > below else 1.0
        out[f"p{q}"] = round((lo + (hi - lo) * frac) * 1e3, 3)
    for le in (0.001, 0.002):
        if le in after:
            out[f"share_le_{le * 1e3:g}ms"] = round(counts[bounds.index(le)] / total, 4)
    return out
