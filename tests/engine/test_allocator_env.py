"""The allocator settings an engine process makes before torch loads: defaults that a user's values
override, and huge pages that PyTorch's allocator really uses."""

import subprocess
import sys
from pathlib import Path

import pytest

from kvmesh.libs.allocator_env import CACHE_VARIABLES, HUGE_PAGES_VARIABLE, engine_allocator_env

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_defaults_are_set_and_user_values_kept(monkeypatch):
    for name in (*CACHE_VARIABLES, HUGE_PAGES_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")
    values = engine_allocator_env(capacity=32)
    assert values == {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32",
        "LRU_CACHE_CAPACITY": "512",
        HUGE_PAGES_VARIABLE: "1",
    }
    monkeypatch.setenv(HUGE_PAGES_VARIABLE, "0")
    assert engine_allocator_env()[HUGE_PAGES_VARIABLE] == "0"


# A fresh process (the variable is read when torch's allocator first runs): allocates and touches
# 64 MiB through torch and prints how much of its anonymous memory is backed by huge pages.
PROBE = """
from kvmesh.libs.allocator_env import engine_allocator_env
engine_allocator_env()
import torch
t = torch.ones(64 << 20, dtype=torch.uint8)
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        print(int(line.split()[1]))
"""


@pytest.mark.skipif(
    not THP.is_file() or "[never]" in THP.read_text(), reason="no transparent huge pages on this kernel"
)
@pytest.mark.parametrize("setting", ["1", "0"])
def test_large_torch_allocations_get_huge_pages(setting):
    env = {"PATH": "/usr/bin:/bin", HUGE_PAGES_VARIABLE: setting}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    huge_kib = int(out.stdout.split()[-1])
    if setting == "1":
        assert huge_kib >= 32 << 10, f"only {huge_kib} KiB of huge pages for a 64 MiB tensor"
    elif "[madvise]" in THP.read_text():
        assert huge_kib < 32 << 10, "huge pages without the allocator's advice"
