"""Thread hygiene for processes that share a few cores.

OpenMP's default busy-wait made runs stall 10-60x at random when several kvmesh processes shared
the 2 cores of the project machines. Every entry point calls `configure_threads` before torch is
imported, so the environment it sets reaches OpenMP's initialisation.
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
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(num_threads))
    import torch

    torch.set_num_threads(num_threads)
    return num_threads
