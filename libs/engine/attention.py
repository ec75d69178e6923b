"""Paged attention over the block-major KV cache: per-step metadata and the CPU (torch) path.

The engine groups a step's sequences in two kinds. Decode sequences (one new token each) are batched
into one pair of matmuls over their gathered context, padded to a bucket shape (step_shapes.py): the
context is gathered into reused buffers (DecodeGather) whose padding is never copied, only masked.
Prefill chunks run one SDPA call each: a chunk that starts at position 0 attends to its own fresh K/V
(causal), a chunk over a cached prefix gathers the prefix from the cache and uses an offset causal
mask. On GPUs the same metadata feeds the Triton kernel in kvmesh.kernels.paged_attention.

Where the C++ CPU kernel (kvmesh.kernels.paged_attention_cpu) is built, decode rows skip the gather
and the matmuls: one kernel call per layer reads every decode sequence's blocks in place
(`AttentionMetadata.decode_kernel`). It creates no oneDNN primitives, so its shapes need no buckets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kvmesh.kernels.paged_attention_cpu import paged_attention_cpu


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's prefill chunk inside the step's flat token batch."""

    start: int  # first row of the chunk in the flat batch
    length: int  # number of new tokens
    context_len: int  # tokens already in the cache before this chunk
    block_table: torch.Tensor  # int64 [num_blocks_needed] covering context_len + length


class DecodeKernelArgs(NamedTuple):
    """The CPU kernel's view of the step's decode rows (int32, built once per step)."""

    block_tables: torch.Tensor  # [num_decode, max_blocks]
    query_start_loc: torch.Tensor  # [num_decode + 1]: 0, 1, 2, ... (one query token each)
    seq_lens: torch.Tensor  # [num_decode]: context length including the new token


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs for one step; built once, shared by all layers."""

    slot_block: torch.Tensor  # int64 [num_tokens]: cache block of each new token
    slot_offset: torch.Tensor  # int64 [num_tokens]: offset inside that block
    num_decode: int  # the first num_decode rows of the batch are decode tokens
    decode_block_tables: torch.Tensor | None  # int64 [num_decode, max_blocks]
    # float32 [1, S, 1, C], S >= num_decode sequences, C >= max_blocks * block_size (the bucket shape):
    # 0 where a decode sequence attends, -inf past its length; padding sequences' rows are all 0
    decode_bias: torch.Tensor | None
    prefills: list[PrefillChunk]
    # [kv_heads, S, C, head_dim] each: where the decode context is gathered, reused by every layer.
    # Everything outside the gathered corner is stale but finite K/V, masked by decode_bias.
    decode_k: torch.Tensor | None = None
    decode_v: torch.Tensor | None = None
    # set when decode rows go through the CPU kernel (then decode_bias/decode_k/decode_v are None)
    decode_kernel: DecodeKernelArgs | None = None

    @property
    def num_tokens(self) -> int:
        """Real tokens in the step; the flat batch may carry padding rows after them."""
        return self.slot_block.shape[0]


class DecodeGather:
    """The decode attention's K/V gather buffers, kept across steps and layers and grown on demand.

    A fresh padded tensor per layer would either copy its padding or have to be zeroed; these are
    zeroed once, then only ever hold K/V values, so their padding is always finite and the -inf bias
    alone hides it (0 x finite = 0 in probs @ V)."""

    __slots__ = ("_k", "_v")

    def __init__(self) -> None:
        self._k = self._v = torch.zeros(0)

    def buffers(
        self, kv_heads: int, seqs: int, ctx: int, head_dim: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        numel = kv_heads * seqs * ctx * head_dim
        if self._k.numel() < numel or self._k.dtype != dtype:
            self._k = torch.zeros(numel, dtype=dtype)
            self._v = torch.zeros(numel, dtype=dtype)
        shape = (kv_heads, seqs, ctx, head_dim)
        return self._k[:numel].view(shape), self._v[:numel].view(shape)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
) -> None:
    """Store the new tokens' K/V ([num_tokens, kv_heads, head_dim]) in their cache slots.
    Caches are one layer's views, [num_blocks, kv_heads, block_size, head_dim]. Padding rows (past
    meta.num_tokens) are not stored."""
    n = meta.num_tokens
    k_cache[meta.slot_block, :, meta.slot_offset] = k[:n]
    v_cache[meta.slot_block, :, meta.slot_offset] = v[:n]


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Contiguous copy of the blocks a table names, head-major:
    [num_blocks, kv_heads, block_size, d] cache, [..., n] table -> [kv_heads, ..., n * block_size, d].
    index_select copies whole blocks (fast); moving the head dim to the front is a second copy,
    still cheaper than attention over strided K/V. (index_select along a non-leading dim of the
    strided view would first copy the whole cache.)"""
    num_kv_heads, block_size, d = cache.shape[1:]
    g = cache.index_select(0, block_table.reshape(-1)).view(*block_table.shape, num_kv_heads, block_size, d)
    g = g.movedim(-3, 0)  # [kvh, ..., n, block_size, d]
    return g.reshape(num_kv_heads, *block_table.shape[:-1], -1, d)


def gather_blocks_into(cache: torch.Tensor, block_table: torch.Tensor, out: torch.Tensor) -> None:
    """gather_blocks for a [seqs, n] table, written into the leading corner of a larger head-major
    buffer: out[:, :seqs, :n * block_size] of out [kv_heads, S, C, d]. Copies no padding."""
    seqs, n = block_table.shape
    num_kv_heads, block_size, d = cache.shape[1:]
    g = cache.index_select(0, block_table.reshape(-1)).view(seqs, n, num_kv_heads, block_size, d)
    out[:, :seqs, : n * block_size].view(num_kv_heads, seqs, n, block_size, d).copy_(g.movedim(2, 0))


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
    (already written to the cache); k_cache/v_cache: one layer's [num_blocks, kv_heads, block_size, d]
    views. Returns [T, heads, d]."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    out[meta.num_tokens :] = 0  # padding rows: finite, ignored
    nd = meta.num_decode
    if nd and meta.decode_kernel is not None:
        a = meta.decode_kernel
        kt, vt = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # the kernel's [blocks, slot, kvh, d]
        paged_attention_cpu(q[:nd], kt, vt, a.block_tables, a.query_start_loc, a.seq_lens, scale, out[:nd])
    elif nd:
        # Batched over (kv head, sequence) with plain matmuls: for one query token per sequence this
        # measured 2x faster than SDPA's CPU flash kernel. The `group` query heads that share a kv
        # head are `group` rows of one matmul (GQA without repeating K/V). Shapes are the bucket's
        # [kvh, S, C]: padding sequences get zero queries, their rows are dropped.
        kd, vd = meta.decode_k, meta.decode_v  # [kvh, S, C, d]
        gather_blocks_into(k_cache, meta.decode_block_tables, kd)
        gather_blocks_into(v_cache, meta.decode_block_tables, vd)
        qd = q[:nd].view(nd, num_kv_heads, group, head_dim).transpose(0, 1)  # [kvh, nd, g, d]
        if kd.shape[1] > nd:
            qd = torch.cat([qd, qd.new_zeros(num_kv_heads, kd.shape[1] - nd, group, head_dim)], 1)
        scores = torch.add(meta.decode_bias, torch.matmul(qd, kd.transpose(-1, -2)), alpha=scale)
        probs = torch.softmax(scores, -1).to(q.dtype)  # float32 softmax
        out[:nd] = torch.matmul(probs, vd)[:, :nd].transpose(0, 1).reshape(nd, num_heads, head_dim)
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.length)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        if chunk.context_len == 0:
            kp = k[rows].transpose(0, 1).unsqueeze(0)
            vp = v[rows].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            total = chunk.context_len + chunk.length
            kp = gather_blocks(k_cache, chunk.block_table)[:, :total].unsqueeze(0)
            vp = gather_blocks(v_cache, chunk.block_table)[:, :total].unsqueeze(0)
            q_pos = torch.arange(chunk.context_len, total).unsqueeze(1)
            mask = torch.arange(total).unsqueeze(0) <= q_pos  # [n, total]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = op.squeeze(0).transpose(0, 1)
    return out
