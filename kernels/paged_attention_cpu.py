"""Paged attention for CPUs as a C++ extension: the Triton kernel's contract (paged_attention.py),
built with the machine's compiler on first use. The extension also carries the engine's RMSNorm
(`rms_norm_cpu`: one pass per row instead of torch's several ops).

The engine's torch path gathers every decode sequence's K/V blocks into a contiguous copy, then runs
a dozen small ops per layer; this kernel reads the blocks in place, one call per layer, with the
fp32 softmax and accumulation of the reference (paged_attention_ref.py). It is built once per
machine (`-march=native`, so the build is keyed by this CPU's feature flags) into torch's extension
cache (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR), which takes ~30-60 s; later loads take
milliseconds. Without a compiler the engine keeps its torch path (`load()` returns None).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_attention_cpu.cpp"
_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


def _cpu_key() -> str:
    """This CPU's feature flags, hashed: a -march=native build must not run on another CPU model."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled extension (built on first use), or None when it cannot be built here.
    KVMESH_CPU_KERNELS=0 turns it off."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is not None or _failed:
            return _module
        if os.environ.get("KVMESH_CPU_KERNELS", "1") == "0":
            _failed = True
            return None
        try:
            from torch.utils.cpp_extension import load as build

            _module = build(
                name=f"kvmesh_paged_attention_cpu_{_cpu_key()}",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-ffast-math"],
                verbose=verbose,
            )
        except Exception as exc:  # no compiler, no headers: the torch path serves
            _failed = True
            log.warning("CPU paged-attention kernel unavailable (%s): using the torch path", exc)
    return _module


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [num_tokens, H, D] attends causally over k_cache / v_cache [num_blocks, block_size, KVH, D]
    (any strides); block_tables, query_start_loc, seq_lens int32. See paged_attention_ref.py."""
    module = load()
    if module is None:
        raise RuntimeError("the CPU paged-attention kernel could not be built on this machine")
    if out is None:
        out = torch.empty_like(q)
    module.paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, out)
    return out


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, as `F.rms_norm(x, (x.shape[-1],), weight, eps)`; torch's op
    where the extension is not built or the tensors do not suit it (not contiguous, mixed dtypes)."""
    module = load()
    if module is None or not (x.is_contiguous() and weight.is_contiguous()) or x.dtype != weight.dtype:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    return module.rms_norm(x, weight, eps)
