"""Triton paged attention against the pure-torch reference, on random paged batches.

The cache is the engine's 6-D block-major layout and the kernel reads layer 1 through strided views.
Every cache element outside the batch's live positions (layer 0, spare blocks, slots past seq_len)
is NaN, and unused block-table entries point at an all-NaN block: a kernel that reads anything it
should not turns its output NaN and fails the comparison.
"""

import os
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from pairwise import shape_matrix

from kvmesh.kernels.paged_attention import paged_attention
from kvmesh.kernels.paged_attention_ref import paged_attention_ref

TOLERANCES = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# name -> (query tokens per sequence, tokens already cached before them)
BATCHES = {
    "decode": ([1, 1, 1, 1], [17, 40, 0, 63]),
    "prefill": ([37], [0]),
    "prefill_batch": ([23, 9, 16], [0, 0, 0]),
    "chunked_prefill": ([20, 9], [33, 64]),
    "mixed": ([1, 30, 1, 12, 5], [50, 0, 7, 40, 80]),
}
HEADS = {"mha": (4, 4), "gqa3": (9, 3)}  # (num_heads, num_kv_heads); 9/3 is SmolLM2's ratio
SHAPES = {"bs16-d64": (16, 64), "bs32-d128": (32, 128)}  # (block_size, head_dim)


class PagedBatch(NamedTuple):
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    scale: float


def make_batch(
    q_lens: list[int],
    cached_lens: list[int],
    *,
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    num_layers: int = 2,
    layer: int = 1,
    seed: int = 0,
    head_major: bool = False,
) -> PagedBatch:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(cached_lens, q_lens, strict=True)]
    blocks_needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 3  # spare blocks stay NaN
    # head_major: the engine's in-block order [kv_heads, block_size, head_dim], fed as transposed views
    inner = (num_kv_heads, block_size) if head_major else (block_size, num_kv_heads)
    kv_cache = torch.full((num_blocks, num_layers, 2, *inner, head_dim), float("nan"))

    block_ids = torch.randperm(num_blocks, generator=gen).tolist()
    poison_block = block_ids.pop()  # never written: every unused table entry points here
    block_tables = torch.full((len(seq_lens), max(blocks_needed) + 2), poison_block, dtype=torch.int32)
    for seq, (seq_len, n) in enumerate(zip(seq_lens, blocks_needed, strict=True)):
        block_tables[seq, :n] = torch.tensor(block_ids[:n], dtype=torch.int32)
        block_ids = block_ids[n:]
        pos = torch.arange(seq_len)
        blocks = block_tables[seq, pos // block_size].long()
        kv = torch.randn(seq_len, 2, num_kv_heads, head_dim, generator=gen)
        if head_major:
            kv_cache[blocks, layer, :, :, pos % block_size] = kv
        else:
            kv_cache[blocks, layer, :, pos % block_size] = kv

    kv_cache = kv_cache.to(dtype=dtype, device=device)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype=dtype, device=device)
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedBatch(
        q=q,
        k_cache=kv_cache[:, layer, 0].transpose(1, 2) if head_major else kv_cache[:, layer, 0],
        v_cache=kv_cache[:, layer, 1].transpose(1, 2) if head_major else kv_cache[:, layer, 1],
        block_tables=block_tables.to(device),
        query_start_loc=query_start_loc.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
    )


def assert_matches_reference(batch: PagedBatch, out: torch.Tensor) -> None:
    expected = paged_attention_ref(*batch)
    assert out.dtype == batch.q.dtype
    tol = TOLERANCES[batch.q.dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


@shape_matrix(
    {
        "batch_name": {name: name for name in BATCHES},
        "block_size,head_dim": SHAPES,
        "heads": HEADS,
        "dtype": {"fp32": torch.float32, "fp16": torch.float16},
    }
)
def test_matches_reference(batch_name, block_size, head_dim, heads, dtype, device):
    q_lens, cached_lens = BATCHES[batch_name]
    num_heads, num_kv_heads = heads
    batch = make_batch(
        q_lens,
        cached_lens,
        block_size=block_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
    )
    assert not batch.k_cache.is_contiguous()
    assert_matches_reference(batch, paged_attention(*batch))


@pytest.mark.parametrize("head_dim", [80, 96])
def test_padded_head_dim(head_dim, device):
    batch = make_batch(
        [1, 14, 6],
        [29, 0, 21],
        block_size=16,
        num_heads=9,
        num_kv_heads=3,
        head_dim=head_dim,
        dtype=torch.float32,
        device=device,
    )
    assert_matches_reference(batch, paged_attention(*batch))


def test_odd_block_size_and_idle_sequence(device):
    """block_size 24 is no power of two; the middle sequence has no query tokens this step."""
    batch = make_batch(
        [5, 0, 1],
        [44, 20, 70],
        block_size=24,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        dtype=torch.float32,
        device=device,
    )
    assert_matches_reference(batch, paged_attention(*batch))


def test_strided_q_and_out(device):
    """q sliced out of a fused qkv projection, written into a slice of a wider buffer."""
    batch = make_batch(
        [3, 1, 18],
        [10, 33, 0],
        block_size=16,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        dtype=torch.float16,
        device=device,
    )
    num_tokens, num_heads, head_dim = batch.q.shape
    qkv = torch.randn(num_tokens, (num_heads + 6) * head_dim, dtype=batch.q.dtype, device=device)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    q.copy_(batch.q)
    out_buffer = torch.zeros(num_tokens, num_heads, 2 * head_dim, dtype=batch.q.dtype, device=device)
    out = out_buffer[:, :, head_dim:]
    assert not q.is_contiguous() and not out.is_contiguous()

    result = paged_attention(q, *batch[1:], out=out)
    assert result is out
    assert_matches_reference(batch, out)
    assert torch.all(out_buffer[:, :, :head_dim] == 0)


def test_independent_strides(device):
    """Views of one cache share strides; the kernel must still read each tensor's own."""
    batch = make_batch(
        [4, 1],
        [30, 52],
        block_size=16,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        dtype=torch.float32,
        device=device,
    )
    # v_cache stored head-major ([blocks, kv_heads, slots, dim]), block table stored column-major.
    v_cache = batch.v_cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    block_tables = batch.block_tables.t().contiguous().t()
    batch = batch._replace(v_cache=v_cache, block_tables=block_tables)
    assert all(k != v for k, v in zip(batch.k_cache.stride()[:3], v_cache.stride()[:3], strict=True))
    assert block_tables.stride(1) != 1
    assert_matches_reference(batch, paged_attention(*batch))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter runs tl.dot on bf16 bits")
def test_bfloat16(device):
    batch = make_batch(
        [1, 12, 4],
        [40, 0, 17],
        block_size=16,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        dtype=torch.bfloat16,
        device=device,
    )
    assert_matches_reference(batch, paged_attention(*batch))


def test_reference_matches_dense_sdpa():
    """The reference itself, against torch SDPA on each sequence's K/V copied out position by position."""
    block_size, num_heads, num_kv_heads = 16, 9, 3
    batch = make_batch(
        [1, 30, 12],
        [50, 0, 40],
        block_size=block_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=64,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    out = paged_attention_ref(*batch)
    starts = batch.query_start_loc.tolist()
    for seq, seq_len in enumerate(batch.seq_lens.tolist()):
        slots = [(int(batch.block_tables[seq, p // block_size]), p % block_size) for p in range(seq_len)]
        k = torch.stack([batch.k_cache[b, s] for b, s in slots], dim=1)  # [kv_heads, seq_len, head_dim]
        v = torch.stack([batch.v_cache[b, s] for b, s in slots], dim=1)
        q = batch.q[starts[seq] : starts[seq + 1]].transpose(0, 1)  # [heads, q_len, head_dim]
        q_len = q.shape[1]
        # Bottom-right aligned causal mask: query i sees the cached prefix plus queries 0..i.
        mask = torch.ones(q_len, seq_len, dtype=torch.bool).tril(diagonal=seq_len - q_len)
        expected = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=batch.scale, enable_gqa=True
        ).transpose(0, 1)
        torch.testing.assert_close(out[starts[seq] : starts[seq + 1]], expected, atol=1e-5, rtol=1e-5)


def _good_inputs() -> dict:
    batch = make_batch(
        [2, 1],
        [5, 9],
        block_size=16,
        num_heads=6,
        num_kv_heads=3,
        head_dim=64,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    return batch._asdict()


BAD_INPUTS = {
    "int64_block_tables": (
        lambda a: {"block_tables": a["block_tables"].long()},
        "block_tables must be int32",
    ),
    "int64_seq_lens": (lambda a: {"seq_lens": a["seq_lens"].long()}, "seq_lens must be int32"),
    "heads_not_multiple": (lambda a: {"q": torch.randn(3, 8, 64)}, "not a multiple of num_kv_heads"),
    "query_start_loc_length": (
        lambda a: {"query_start_loc": torch.tensor([0, 3], dtype=torch.int32)},
        "query_start_loc must be",
    ),
    "block_tables_rows": (lambda a: {"block_tables": a["block_tables"][:1]}, "rows for 2 sequences"),
    "q_rank": (lambda a: {"q": a["q"].flatten(1)}, "q must be"),
    "cache_dtype": (lambda a: {"q": a["q"].half()}, "must match q dtype"),
    "int_q": (lambda a: {"q": a["q"].int()}, "is not one of"),
    "head_dim": (lambda a: {"q": a["q"][..., :32]}, "head_dim"),
    "kv_shapes": (lambda a: {"v_cache": a["v_cache"][:-1]}, "differ in shape"),
    "out_shape": (lambda a: {"out": torch.empty(1, 6, 64)}, "out"),
    "device": (lambda a: {"seq_lens": a["seq_lens"].to("meta")}, "one device"),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_rejects_bad_inputs(bad):
    make_bad, message = bad
    args = _good_inputs()
    args |= make_bad(args)
    with pytest.raises(ValueError, match=message):
        paged_attention(**args)


def test_engine_cache_layout(device):
    """The engine's head-major blocks, passed as transposed views, give the same results."""
    q_lens, cached_lens = [1, 7, 1, 12], [30, 0, 17, 21]
    kw = dict(block_size=16, num_heads=9, num_kv_heads=3, head_dim=64, dtype=torch.float32, device=device)
    batch = make_batch(q_lens, cached_lens, head_major=True, **kw)
    assert not batch.k_cache.is_contiguous()
    assert_matches_reference(batch, paged_attention(*batch))
