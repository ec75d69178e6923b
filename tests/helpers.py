"""Message factories shared by tests in several folders.

Import as `from helpers import ...`: pytest puts tests/ on sys.path, as the folder of tests/conftest.py.
"""

from __future__ import annotations

from kvmesh.schemas.messages import Heartbeat, WorkerStats


def worker_stats(
    worker_id: str, outstanding_tokens: int = 0, role: str = "aggregated", **fields: object
) -> WorkerStats:
    """An idle worker's stats (nothing running, 100 free blocks); `fields` set any other field."""
    base: dict[str, object] = {
        "worker_id": worker_id,
        "role": role,
        "model": "m",
        "num_running": 0,
        "num_waiting": 0,
        "num_blocks": 100,
        "num_free_blocks": 100,
        "kv_usage": 0.0,
        "outstanding_tokens": outstanding_tokens,
    }
    return WorkerStats(**(base | fields))


def heartbeat(
    worker_id: str,
    outstanding_tokens: int = 0,
    role: str = "aggregated",
    ts: float = 0.0,
    interval_s: float = 1e6,
) -> Heartbeat:
    """A heartbeat carrying `worker_stats(worker_id, outstanding_tokens, role)`; the default
    interval never expires within a test."""
    return Heartbeat(stats=worker_stats(worker_id, outstanding_tokens, role), ts=ts, interval_s=interval_s)
