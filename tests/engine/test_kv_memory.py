"""The KV cache's host memory: zeroed, contiguous, 2 MiB aligned and advised for huge pages."""

from pathlib import Path

import torch

from kvmesh.libs.engine.kv_memory import HUGE_PAGE, advise_huge_pages, alloc_kv_cache


def kernel_has_thp() -> bool:
    return Path("/sys/kernel/mm/transparent_hugepage/enabled").is_file()


def test_cache_is_zeroed_contiguous_and_huge_page_aligned():
    shape = (37, 3, 2, 2, 16, 8)
    cache = alloc_kv_cache(shape, torch.bfloat16)
    assert cache.shape == shape and cache.dtype == torch.bfloat16 and cache.is_contiguous()
    assert cache.data_ptr() % HUGE_PAGE == 0
    assert not cache.float().abs().sum()
    cache[5].fill_(1.5)  # the views behind it are one buffer: writes stay where they belong
    assert cache[5].float().mean() == 1.5 and not cache[4].float().abs().sum()


def test_large_caches_are_advised_for_huge_pages():
    cache = alloc_kv_cache((8, 1 << 20), torch.float16)  # 16 MiB
    advised = advise_huge_pages(cache.data_ptr(), cache.numel() * cache.element_size())
    assert advised == kernel_has_thp()
    assert not advise_huge_pages(cache.data_ptr() + 1, 4096), "nothing aligned to advise"
