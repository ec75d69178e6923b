"""Paged attention over the block-major KV cache: per-step metadata and the CPU (torch) path.

The engine groups a step's sequences in two kinds. Decode sequences (one new token each) are batched
into a single SDPA call over their gathered, padded context. Prefill chunks run one SDPA call each:
a chunk that starts at position 0 attends to its own fresh K/V (causal), a chunk over a cached prefix
gathers the prefix from the cache and uses an offset causal mask. On GPUs the same metadata feeds the
Triton kernel in kvmesh.kernels.paged_attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's prefill chunk inside the step's flat token batch."""

    start: int  # first row of the chunk in the flat batch
    length: int  # number of new tokens
    context_len: int  # tokens already in the cache before this chunk
    block_table: torch.Tensor  # int64 [num_blocks_needed] covering context_len + length


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs for one step; built once, shared by all layers."""

    slot_block: torch.Tensor  # int64 [num_tokens]: cache block of each new token
    slot_offset: torch.Tensor  # int64 [num_tokens]: offset inside that block
    num_decode: int  # the first num_decode rows of the batch are decode tokens
    decode_block_tables: torch.Tensor | None  # int64 [num_decode, max_blocks]
    decode_mask: torch.Tensor | None  # bool [num_decode, 1, 1, max_blocks * block_size]
    prefills: list[PrefillChunk]


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
) -> None:
    """Store the new tokens' K/V ([num_tokens, kv_heads, head_dim]) in their cache slots."""
    k_cache[meta.slot_block, meta.slot_offset] = k
    v_cache[meta.slot_block, meta.slot_offset] = v


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[..., blocks] table -> [..., blocks * block_size, kv_heads, head_dim] contiguous copy.
    index_select copies whole blocks; advanced indexing on the strided view was 2.5x slower."""
    g = cache.index_select(0, block_table.reshape(-1))
    return g.view(*block_table.shape[:-1], -1, *cache.shape[2:])


def paged_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention for a mixed batch. q: [T, heads, d]; k, v: the same step's new [T, kv_heads, d]
    (already written to the cache). k_cache/v_cache: [num_blocks, block_size, kv_heads, d] views.
    Returns [T, heads, d]."""
    _num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        # GQA without copies: the `group` query heads sharing a kv head become `group` query rows.
        qd = q[:nd].view(nd, num_kv_heads, group, head_dim)
        kd = _gather(k_cache, meta.decode_block_tables).transpose(1, 2)
        vd = _gather(v_cache, meta.decode_block_tables).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        out[:nd] = od.view(nd, num_heads, head_dim)
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.length)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        if chunk.context_len == 0:
            kp = k[rows].transpose(0, 1).unsqueeze(0)
            vp = v[rows].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            total = chunk.context_len + chunk.length
            kp = _gather(k_cache, chunk.block_table)[:total].transpose(0, 1).unsqueeze(0)
            vp = _gather(v_cache, chunk.block_table)[:total].transpose(0, 1).unsqueeze(0)
            q_pos = torch.arange(chunk.context_len, total).unsqueeze(1)
            mask = torch.arange(total).unsqueeze(0) <= q_pos  # [n, total]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = op.squeeze(0).transpose(0, 1)
    return out
