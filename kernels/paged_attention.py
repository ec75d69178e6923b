"""Paged attention: one Triton kernel for prefill, chunked prefill and decode over a paged KV cache.

Every sequence brings `q_len >= 0` new query tokens whose K/V are already in the cache, after
`seq_len - q_len` cached tokens. Query token i of a sequence sits at position `seq_len - q_len + i`
and attends causally to KV positions `0..position`. Decode is simply `q_len == 1`, so a mixed batch
runs in a single launch ("varlen over a paged prefix").

Tiling: a program owns one kv head and BLOCK_Q consecutive query tokens of one sequence, packed
with all QUERIES_PER_KV query heads of that kv head into BLOCK_M rows (row r is token r // G,
head r % G), so each K/V tile is loaded once per GQA group. Programs walk the KV positions in
TILE_N steps, looking the physical block up per position, with an fp32 online softmax.
"""

import torch
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_DOT_DIM = 16  # tl.dot needs every dimension >= 16 on GPUs
_TILE_N = 32  # KV positions per inner step; independent of the cache's block_size


@triton.jit
def _find_seq(query_start_loc_ptr, tile_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """Index of the sequence that owns query tile `tile_idx`.

    Sequence s owns the tiles [first(s), first(s + 1)) with first(s) = query_start_loc[s] // BLOCK_Q + s:
    that range holds at least cdiv(q_len, BLOCK_Q) tiles and first() is strictly increasing, so the
    owner is the last s with first(s) <= tile_idx (binary search; invariant first(lo) <= tile_idx).
    """
    lo = tl.full([], 0, tl.int32)
    hi = lo + num_seqs
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        mid_first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        owned_later = mid_first <= tile_idx
        lo = tl.where(owned_later, mid, lo)
        hi = tl.where(owned_later, hi, mid)
    return lo


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], any strides
    v_cache_ptr,  # same shape as k_cache, its own strides
    out_ptr,  # [num_tokens, num_heads, head_dim]
    block_tables_ptr,  # int32 [num_seqs, max_blocks_per_seq]
    query_start_loc_ptr,  # int32 [num_seqs + 1]
    seq_lens_ptr,  # int32 [num_seqs], cached + new tokens
    scale,  # softmax scale, usually head_dim ** -0.5
    num_seqs,
    stride_q_tok,
    stride_q_head,
    stride_q_dim,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_k_dim,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_v_dim,
    stride_o_tok,
    stride_o_head,
    stride_o_dim,
    stride_bt_seq,
    stride_bt_block,
    BLOCK_SIZE: tl.constexpr,  # KV positions per cache block (any positive int)
    HEAD_DIM: tl.constexpr,  # real head dim; BLOCK_D is its power-of-two padding
    BLOCK_D: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,  # GQA group size: query heads sharing one kv head
    BLOCK_Q: tl.constexpr,  # query tokens per program; BLOCK_Q * QUERIES_PER_KV <= BLOCK_M
    BLOCK_M: tl.constexpr,  # rows per program (power of two >= 16), the tail rows are padding
    TILE_N: tl.constexpr,  # KV positions per inner step
    # Switch: "ieee" keeps fp32 inputs exact on GPUs (the default "tf32" would round them to
    # 10 mantissa bits); fp16/bf16 inputs ignore it.
    DOT_PRECISION: tl.constexpr,
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)

    seq = _find_seq(query_start_loc_ptr, tile_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile_q_start = (tile_idx - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # relative to the sequence
    if tile_q_start >= q_len:
        return  # the grid is an upper bound on the number of tiles
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # positions cached before this step's query tokens

    rows = tl.arange(0, BLOCK_M)
    q_tok = tile_q_start + rows // QUERIES_PER_KV  # token index within the sequence
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (q_tok < q_len)
    q_pos = context_len + q_tok
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM

    tok = (q_start + q_tok).to(tl.int64)
    q_offsets = tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + offs_d[None, :] * stride_q_dim
    q = tl.load(q_ptr + q_offsets, mask=row_valid[:, None] & d_valid[None, :], other=0.0)

    # A finite floor instead of -inf keeps padding rows (all scores masked) free of inf - inf = NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634  # folds log2(e) in: the softmax runs on exp2

    # The last valid row sees the most context; nothing at or past kv_end is read.
    kv_end = context_len + tl.minimum(tile_q_start + BLOCK_Q, q_len)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    offs_n = tl.arange(0, TILE_N)
    for kv_start in range(0, kv_end, TILE_N):
        kv_pos = kv_start + offs_n
        kv_valid = kv_pos < kv_end
        block_ids = tl.load(block_table + (kv_pos // BLOCK_SIZE) * stride_bt_block, mask=kv_valid, other=0)
        # int64: block_id * stride_block overflows int32 once the cache passes 2**31 elements.
        block_ids = block_ids.to(tl.int64)
        slots = kv_pos % BLOCK_SIZE

        k_offsets = (
            block_ids[None, :] * stride_k_block
            + slots[None, :] * stride_k_slot
            + kv_head * stride_k_head
            + offs_d[:, None] * stride_k_dim
        )
        k_t = tl.load(k_cache_ptr + k_offsets, mask=d_valid[:, None] & kv_valid[None, :], other=0.0)
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
        visible = row_valid[:, None] & (kv_pos[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)

        v_offsets = (
            block_ids[:, None] * stride_v_block
            + slots[:, None] * stride_v_slot
            + kv_head * stride_v_head
            + offs_d[None, :] * stride_v_dim
        )
        v = tl.load(v_cache_ptr + v_offsets, mask=kv_valid[:, None] & d_valid[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # padding rows have l_i == 0
    o_offsets = tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + offs_d[None, :] * stride_o_dim
    tl.store(
        out_ptr + o_offsets, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :]
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the batch's query tokens over their paged KV; returns `out` ([num_tokens, H, D]).

    Shapes: q [num_tokens, num_heads, head_dim]; k_cache / v_cache [num_blocks, block_size,
    num_kv_heads, head_dim] with any strides (per-layer views of the block-major cache);
    block_tables int32 [num_seqs, max_blocks_per_seq]; query_start_loc int32 [num_seqs + 1];
    seq_lens int32 [num_seqs] counting cached plus new tokens.

    Checked here: everything that needs no look at the tensors' values. Not checked, to keep the
    launch free of device syncs: query_start_loc starts at 0, is non-decreasing and ends at
    num_tokens; q_len <= seq_len; the block table covers seq_len positions with valid block ids.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0 or num_tokens == 0:
        return out

    queries_per_kv = num_heads // num_kv_heads
    block_m = max(_MIN_DOT_DIM, triton.next_power_of_2(queries_per_kv))
    block_q = block_m // queries_per_kv
    # Each sequence owns cdiv(q_len, block_q) <= q_len // block_q + 1 tiles: this bounds the sum.
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_start_loc,
        seq_lens,
        float(scale),
        num_seqs,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *out.stride(),
        *block_tables.stride(),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_D=max(_MIN_DOT_DIM, triton.next_power_of_2(head_dim)),
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        TILE_N=_TILE_N,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor | None,
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4:
            raise ValueError(
                f"{name} must be [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(cache.shape)}"
            )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not one of {_SUPPORTED_DTYPES}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"k_cache/v_cache dtypes {k_cache.dtype}/{v_cache.dtype} must match q dtype {q.dtype}"
        )

    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, cache_head_dim = k_cache.shape[2], k_cache.shape[3]
    if cache_head_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {cache_head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")

    for name, table in (
        ("block_tables", block_tables),
        ("query_start_loc", query_start_loc),
        ("seq_lens", seq_lens),
    ):
        if table.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {table.dtype}")
    if block_tables.dim() != 2:
        raise ValueError(
            f"block_tables must be [num_seqs, max_blocks_per_seq], got {tuple(block_tables.shape)}"
        )
    if seq_lens.dim() != 1:
        raise ValueError(f"seq_lens must be [num_seqs], got shape {tuple(seq_lens.shape)}")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.dim() != 1 or query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"query_start_loc must be [num_seqs + 1] = [{num_seqs + 1}], got {tuple(query_start_loc.shape)}"
        )
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")

    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must match q {tuple(q.shape)} {q.dtype}")
    tensors = {
        "q": q,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": block_tables,
        "query_start_loc": query_start_loc,
        "seq_lens": seq_lens,
        "out": out,
    }
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
