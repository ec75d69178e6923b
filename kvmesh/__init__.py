"""kvmesh: a KV-cache-aware, disaggregated LLM serving mesh (see the README).

The offline API, named as vLLM's: `from kvmesh import LLM, SamplingParams`. Both are imported on first
use, so `import kvmesh` (and `kvmesh.__version__`) stays light: no torch, no model code.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmesh.libs.engine.llm import LLM
    from kvmesh.libs.engine.sampling_params import SamplingParams

try:
    __version__ = metadata.version("kvmesh")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from kvmesh.libs.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kvmesh.libs.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'kvmesh' has no attribute {name!r}")
