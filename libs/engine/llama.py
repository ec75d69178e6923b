"""Our forward pass for the Llama family (Llama, Qwen2, Qwen3) over the paged KV cache.

Plain tensors and functional ops, no nn.Module tree: a decode step at batch 1 is dominated by
per-op overhead (30 layers x every op), so the layer is written to issue as few ops as possible:
fused qkv and gate/up projections, RoPE applied to q and k together with one roll, residual adds
fused into the output projections (oneDNN binary post-op).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kvmesh.libs.engine.attention import AttentionMetadata, paged_attention_torch, write_kv
from kvmesh.libs.engine.config import ModelConfig, native_bf16


class Linear:
    """y = x @ W.T (+ b) (+ residual). For bf16 on a CPU that computes it natively the weight is
    prepacked once into oneDNN's blocked layout (an AVX2 CPU refuses it): plain F.linear re-reads it
    in the unpacked layout on every call, which measured 1.5-2x slower for the small batches of
    decode steps (bandwidth-bound)."""

    __slots__ = ("bias", "packed", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self.packed = None
        if weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() and native_bf16():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + self(x), fused where the backend can."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        return torch.addmm(residual, x, self.weight.t()) if self.bias is None else residual + self(x)


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # [(heads + 2 * kv_heads) * head_dim, hidden]
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: Linear
    post_norm: torch.Tensor
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear


def _rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind is not None:
        raise ValueError(f"rope scaling {kind!r} is not supported")
    return inv_freq.float()


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class LlamaModel:
    """Weights plus a `forward` over a flat batch of new tokens and a `compute_logits` head."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.dtype = dtype

        def w(name: str) -> torch.Tensor:
            return weights[name].to(dtype).contiguous()

        def maybe(name: str) -> torch.Tensor | None:
            return w(name) if name in weights else None

        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        self.lm_head = Linear(self.embed if cfg.tie_word_embeddings else w("lm_head.weight"))
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            bias = None
            if cfg.qkv_bias:
                bias = torch.cat([w(a + "q_proj.bias"), w(a + "k_proj.bias"), w(a + "v_proj.bias")])
            self.layers.append(
                LayerWeights(
                    input_norm=w(p + "input_layernorm.weight"),
                    qkv=Linear(
                        torch.cat([w(a + "q_proj.weight"), w(a + "k_proj.weight"), w(a + "v_proj.weight")]),
                        bias,
                    ),
                    q_norm=maybe(a + "q_norm.weight"),
                    k_norm=maybe(a + "k_norm.weight"),
                    o_proj=Linear(w(a + "o_proj.weight")),
                    post_norm=w(p + "post_attention_layernorm.weight"),
                    gate_up=Linear(torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")])),
                    down=Linear(w(p + "mlp.down_proj.weight")),
                )
            )
        # RoPE tables, HF's half-split layout. rotate_half(x) * sin == roll(x, d/2) * [-sin, sin].
        positions = torch.arange(cfg.max_model_len, dtype=torch.float32)
        freqs = torch.outer(positions, _rope_inv_freq(cfg))
        self.cos = torch.cat([freqs.cos(), freqs.cos()], -1).to(dtype)
        self.sin_signed = torch.cat([-freqs.sin(), freqs.sin()], -1).to(dtype)
        self.scale = cfg.head_dim**-0.5
        # The hidden-size RMSNorms (twice per layer, and the final one). ModelRunner swaps in the C++
        # CPU kernel (kernels/paged_attention_cpu.py) where it is built and enabled.
        self.rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = torch_rms_norm

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype) -> LlamaModel:
        cfg = ModelConfig.from_folder(folder)
        weights: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            weights.update(load_file(f))
        if not weights:
            raise FileNotFoundError(f"no *.safetensors weights in {folder}")
        return cls(cfg, weights, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of the new tokens; writes their K/V into `kv_cache`
        ([num_blocks, num_layers, 2, kv_heads, block_size, head_dim])."""
        cfg = self.cfg
        n = input_ids.shape[0]
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin_signed[positions].unsqueeze(1)
        h = self.embed[input_ids]
        for i, lw in enumerate(self.layers):
            x = self.rms_norm(h, lw.input_norm, eps)
            qkv = lw.qkv(x)
            qk = qkv[:, : (nh + nkv) * d].view(n, nh + nkv, d)
            v = qkv[:, (nh + nkv) * d :].view(n, nkv, d)
            if lw.q_norm is not None:
                qk = torch.cat(
                    [
                        F.rms_norm(qk[:, :nh], (d,), lw.q_norm, eps),
                        F.rms_norm(qk[:, nh:], (d,), lw.k_norm, eps),
                    ],
                    1,
                )
            qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)
            q, k = qk[:, :nh], qk[:, nh:]
            k_cache, v_cache = kv_cache[:, i, 0], kv_cache[:, i, 1]
            write_kv(k_cache, v_cache, k, v, meta)
            attn = paged_attention_torch(q, k, v, k_cache, v_cache, meta, self.scale)
            h = lw.o_proj.add(attn.view(n, nh * d), h)
            x = self.rms_norm(h, lw.post_norm, eps)
            gate, up = lw.gate_up(x).chunk(2, -1)
            h = lw.down.add(F.silu(gate) * up, h)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, vocab] for the given hidden rows."""
        x = self.rms_norm(hidden.contiguous(), self.norm, self.cfg.rms_norm_eps)
        return self.lm_head(x).float()
