"""The KV cache's memory: one tensor, on host memory backed by transparent huge pages.

Huge pages matter twice on CPUs: attention reads blocks scattered over a gigabyte (4 KiB pages mean
a TLB miss per few blocks), and NIXL's UCX moves host memory between processes with CMA
(process_vm_readv), which pins every page it copies: with 2 MiB pages a pull ran at ~9-11 GB/s
instead of ~4 GB/s here (loadtest/disagg_bench.py). Linux hands out huge pages only to ranges that
are advised (THP "madvise" mode, the common default) and 2 MiB aligned, so the cache is carved out
of an aligned range of a larger buffer and advised before its first touch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


def alloc_kv_cache(
    shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """A zeroed contiguous tensor; on the CPU 2 MiB aligned and advised for huge pages."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    offset = -buf.data_ptr() % HUGE_PAGE
    cache = buf[offset : offset + nbytes].view(dtype).view(shape)
    advise_huge_pages(cache.data_ptr(), nbytes)
    cache.zero_()  # first touch, after the advice
    return cache


def advise_huge_pages(addr: int, nbytes: int) -> bool:
    """madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of [addr, addr + nbytes); False if refused."""
    start = addr + (-addr % HUGE_PAGE)
    end = (addr + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        ok = libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):  # not Linux: no advice to give
        return False
    if not ok:
        log.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
    return ok
