"""Typed configuration: the model's architecture (read from config.json) and the engine's knobs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The architecture facts the forward pass needs, parsed once from an HF config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_model_len: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 has biases on q/k/v projections
    qk_norm: bool  # Qwen3 normalises each head of q and k
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        raw = json.loads((folder / "config.json").read_text())
        model_type = raw.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model_type {model_type!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})"
            )
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        gen_cfg = folder / "generation_config.json"
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id", eos)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope if rope_type not in ("default", None) else None,
            max_model_len=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=raw.get("attention_bias", model_type == "qwen2"),
            qk_norm=model_type == "qwen3",
            eos_token_ids=eos_ids,
        )


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BW/VL/DQ, as oneDNN's bf16 path needs; AMX
    included). Without it (an AVX2-only CPU) bf16 is emulated: measured 3-5x slower than fp32 for the
    default model's matmuls, and oneDNN's prepacked bf16 weights refuse to load at all."""
    return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype by name; "auto": bfloat16 where the CPU computes it natively, else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {['auto', *sorted(_DTYPES)]}") from None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine knobs. Defaults suit the 135M default model on a 2-core CPU."""

    model: str = "SmolLM2-135M-Instruct"
    # "auto": bf16 where the CPU computes it natively (AVX-512, AMX: bf16 prefill measured ~2x fp32
    # there), else fp32 (an AVX2 CPU emulates bf16, 3-5x slower than fp32)
    dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None  # KV blocks; None derives it from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # token budget per step (chunked prefill splits longer prompts)
    max_model_len: int | None = None  # None: the model's own context length
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # pad each step's shapes up to buckets (step_shapes.py): bounded oneDNN shape caches, flat memory
    bucket_step_shapes: bool = True
    # decode attention and the RMSNorms through the C++ CPU kernels (kernels/paged_attention_cpu.py)
    # where they build
    cpu_attention_kernel: bool = True
    hash_seed: int | None = None  # None: KVMESH_HASH_SEED or the built-in default
    seed: int = 0

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
