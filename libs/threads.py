"""Thread hygiene for processes that share a few cores.

OpenMP's default busy-wait made runs stall 10-60x at random when several kvmesh processes shared
the 2 cores of the project machines. Fully passive waits cure that but make every parallel region
pay a thread wake-up: a decode step has ~600 small ops, and a 256-row RMSNorm took 600 us instead
of 90. So idle OpenMP threads spin briefly (GOMP_SPINCOUNT=10000, microseconds) and then sleep:
back-to-back ops find their threads awake, an idle process gives its cores away at once.
Every entry point calls `configure_threads` before torch is imported, so the environment it sets
reaches OpenMP's initialisation.
"""

from __future__ import annotations

import os


def configure_threads(num_threads: int | None = None) -> int:
    """Set OpenMP/MKL thread env defaults (passive waiting) and torch's thread count.

    `num_threads` defaults to `KVMESH_THREADS`, else every core this process may run on.
    Returns the thread count applied.
    """
    if num_threads is None:
        env = os.environ.get("KVMESH_THREADS")
        num_threads = int(env) if env else len(os.sched_getaffinity(0))
    num_threads = max(1, num_threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # libgomp (torch's OpenMP): bounded spin
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(num_threads))
    import torch

    torch.set_num_threads(num_threads)
    return num_threads
