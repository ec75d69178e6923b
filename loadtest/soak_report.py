"""What soak.py measures and how it tallies it: each request's `Record` and the outcomes' summary,
every mesh process's RSS over the run (`RssSampler`, whose report says flat or climbing), and the
workers' KV blocks once the load stops. soak.py's `judge` turns these into the verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import asdict, dataclass

from kvmesh.loadtest.load_report import pct_ms

# Flat memory: the last quarter's median RSS at most this much above the third quarter's (MiB, share).
# Over 300 s that flags climbs above ~16 MiB/min on a 2 GiB worker, ~6 MiB/min on the gateway.
LATE_GROWTH_TOLERANCE = (8.0, 0.01)


@dataclass
class Record:
    index: int
    phase: str
    start: float
    end: float = 0.0
    stream: bool = True
    max_tokens: int = 0
    leave_after_s: float | None = None  # this client's planned disconnect
    outcome: str = ""  # ok | rejected | disconnected | lost
    status: int | None = None
    tokens: int = 0
    ttft_s: float | None = None
    detail: str = ""


class RssSampler:
    """Every `every` s, the RSS of each mesh process (a restarted one is a new series: name#2)."""

    def __init__(self, mesh, every: float) -> None:
        self.mesh, self.every = mesh, every
        self.series: dict[str, list[tuple[float, int]]] = {}
        self._pids: dict[str, int] = {}
        self.t0 = time.monotonic()

    def sample(self) -> None:
        import psutil

        now = round(time.monotonic() - self.t0, 1)
        for proc in self.mesh.procs:
            pid = proc.popen.pid
            if proc.popen.poll() is not None:
                continue
            key = proc.name
            if self._pids.setdefault(proc.name, pid) != pid:
                key = f"{proc.name}#2"
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
            self.series.setdefault(key, []).append((now, rss))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every)

    def report(
        self, steady_from: float, restarted_from: float | None = None, killed: str | None = None
    ) -> dict[str, dict]:
        """Per process over its steady part (from `steady_from`; for a restarted process, name#2, from
        when it serves again: `restarted_from`): MiB at its start and end (medians of the first and
        last quarter of the samples), the peak, the least-squares slope (MiB/min), and the late growth:
        last quarter's median minus third quarter's. Flat: no late growth beyond LATE_GROWTH_TOLERANCE:
        caches may warm up early on, but nothing may still climb at the end (allocator noise aside). The
        `killed` process's first life is reported but not judged: it ended mid-run, warming up."""
        out = {}
        mib, share = LATE_GROWTH_TOLERANCE
        for name, points in self.series.items():
            since = restarted_from if name.endswith("#2") and restarted_from is not None else steady_from
            pts = [(t, rss / 2**20) for t, rss in points if t >= since] or [(t, r / 2**20) for t, r in points]
            q = max(1, len(pts) // 4)
            quarters = [
                statistics.median(v for _, v in pts[k * q : (k + 1) * q] or pts[-q:]) for k in range(4)
            ]
            first, third, last = quarters[0], quarters[2], statistics.median(v for _, v in pts[-q:])
            slope = 0.0
            if len(pts) >= 3:
                ts, vs = [t for t, _ in pts], [v for _, v in pts]
                mt, mv = statistics.fmean(ts), statistics.fmean(vs)
                var = sum((t - mt) ** 2 for t in ts)
                slope = sum((t - mt) * (v - mv) for t, v in pts) / var * 60 if var else 0.0
            out[name] = {
                "samples": len(pts),
                "start_mib": round(first, 1),
                "end_mib": round(last, 1),
                "peak_mib": round(max(v for _, v in pts), 1),
                "slope_mib_per_min": round(slope, 2),
                "late_growth_mib": round(last - third, 1),
                "flat": None if name == killed else last - third <= max(mib, share * last),
                "series_mib": [[t, round(rss / 2**20, 1)] for t, rss in points],
            }
        return out


async def worker_stats(nats_url: str, worker_ids: list[str]) -> dict[str, dict]:
    from kvmesh.libs.bus import Bus
    from kvmesh.schemas.messages import StatsRequest, Subjects, WorkerStats

    bus = await Bus.connect(nats_url, "soak")
    try:
        out = {}
        for w in worker_ids:
            s = await bus.request(
                Subjects.worker(w, "stats"), StatsRequest(check_integrity=True), WorkerStats, 30
            )
            out[w] = {
                "num_running": s.num_running,
                "num_waiting": s.num_waiting,
                "num_blocks": s.num_blocks,
                "num_free_blocks": s.num_free_blocks,
                "integrity_error": s.integrity_error,
                "all_blocks_returned": s.num_free_blocks == s.num_blocks
                and not (s.num_running or s.num_waiting),
            }
        return out
    finally:
        await bus.close()


def summarize(records: list[Record]) -> dict:
    counts = {k: sum(r.outcome == k for r in records) for k in ("ok", "rejected", "disconnected", "lost")}
    ok = [r for r in records if r.outcome == "ok"]
    window = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    return {
        "requests": len(records),
        **counts,
        "rejected_by_status": {
            str(s): sum(r.status == s for r in records if r.outcome == "rejected") for s in (429, 503)
        },
        "completed_per_s": round(len(ok) / window, 3) if window else 0.0,
        "output_tokens_per_s": round(sum(r.tokens for r in ok) / window, 1) if window else 0.0,
        "ttft_ms": {
            q: round(pct_ms([r.ttft_s for r in ok if r.ttft_s is not None], q), 1) for q in (50, 90, 99)
        },
        "e2e_ms": {q: round(pct_ms([r.end - r.start for r in ok], q), 1) for q in (50, 90, 99)},
        "lost_examples": [asdict(r) for r in records if r.outcome == "lost"][:20],
    }
