"""Bounded shape caches for processes that run the engine on CPUs.

oneDNN keeps every primitive it creates in a cache of ONEDNN_PRIMITIVE_CACHE_CAPACITY entries and
PyTorch's ideep layer keeps its own LRU of LRU_CACHE_CAPACITY entries, 1024 each by default: one entry
per distinct shape of an op, 0.4-0.8 MiB each here (JIT-compiled kernels). Each cache keeps alive what
the other evicted, so memory stops growing only when both are bounded (measured: either one alone
still grows by ~1.7 MiB per new linear shape). The engine pads its steps to few shapes
(libs/engine/step_shapes.py); these bounds cap what the shapes it does meet can cost.

Both variables are read once, when torch first uses the caches: call `bound_shape_caches` before
torch is imported. A value already in the environment is the user's and is kept.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
DEFAULT_CAPACITY = 64


def bound_shape_caches(capacity: int = DEFAULT_CAPACITY) -> dict[str, str]:
    """Default both caches' capacity to `capacity` entries unless set already; returns the values in
    force."""
    if "torch" in sys.modules:
        log.warning("bound_shape_caches called after torch was imported: the bounds may not apply")
    for name in CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in CACHE_VARIABLES}
