"""The engine's CPU attention path against the pure-torch paged-attention reference."""

import pytest
import torch

from kvmesh.kernels.paged_attention_ref import paged_attention_ref
from kvmesh.libs.engine.attention import AttentionMetadata, PrefillChunk, paged_attention_torch, write_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32)])
def test_mixed_batch_matches_reference(dtype, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(0)
    bs, num_blocks, layers = 16, 40, 2
    kv = torch.randn(num_blocks, layers, 2, kv_heads, bs, head_dim, generator=g).to(dtype)
    k_cache, v_cache = kv[:, 1, 0], kv[:, 1, 1]  # the engine's views: [blocks, kv_heads, block_size, d]
    perm = torch.randperm(num_blocks, generator=g)
    # (context already cached, new tokens): two decodes, a fresh prefill, a prefill over a prefix
    seqs = [(37, 1), (5, 1), (0, 21), (40, 19)]
    tables, taken = [], 0
    for c, n in seqs:
        need = -(-(c + n) // bs)
        tables.append(perm[taken : taken + need])
        taken += need
    total = sum(n for _, n in seqs)
    q = torch.randn(total, heads, head_dim, generator=g).to(dtype)
    k_new = torch.randn(total, kv_heads, head_dim, generator=g).to(dtype)
    v_new = torch.randn(total, kv_heads, head_dim, generator=g).to(dtype)
    slot_block, slot_off, prefills, row = [], [], [], 0
    for i, (c, n) in enumerate(seqs):
        for p in range(c, c + n):
            slot_block.append(int(tables[i][p // bs]))
            slot_off.append(p % bs)
        if i >= 2:
            prefills.append(PrefillChunk(row, n, c, tables[i]))
        row += n
    width = max(len(t) for t in tables[:2])
    dtables = torch.stack([torch.nn.functional.pad(t, (0, width - len(t))) for t in tables[:2]])
    # the decode batch padded to a bucket shape: 2 sequences -> 3, width + 2 blocks, the gather
    # buffers' padding full of stale (finite) values: the bias alone must hide it
    seqs_b, ctx_b = 3, (width + 2) * bs
    lens = torch.tensor([c + n for c, n in seqs[:2]] + [ctx_b])
    pad = torch.arange(ctx_b)[None] >= lens[:, None]
    decode_k, decode_v = (
        torch.randn(kv_heads, seqs_b, ctx_b, head_dim, generator=g).to(dtype) * 100 for _ in range(2)
    )
    num_pad_rows = 5  # the step's flat batch is padded too: these rows are neither stored nor attended
    meta = AttentionMetadata(
        slot_block=torch.tensor(slot_block),
        slot_offset=torch.tensor(slot_off),
        num_decode=2,
        decode_block_tables=dtables,
        decode_bias=torch.zeros(pad.shape).masked_fill(pad, float("-inf")).view(1, seqs_b, 1, -1),
        prefills=prefills,
        decode_k=decode_k,
        decode_v=decode_v,
    )
    q, k_new, v_new = (torch.cat([x, torch.full_like(x[:num_pad_rows], 1e4)]) for x in (q, k_new, v_new))
    untouched = kv[perm[taken:]].clone()
    write_kv(k_cache, v_cache, k_new, v_new, meta)
    assert torch.equal(kv[perm[taken:]], untouched), "padding rows were written to the cache"
    scale = head_dim**-0.5
    ours = paged_attention_torch(q, k_new, v_new, k_cache, v_cache, meta, scale)
    assert torch.all(ours[total:] == 0)
    ours = ours[:total]
    q = q[:total]

    full_width = max(len(t) for t in tables)
    block_tables = torch.stack([torch.nn.functional.pad(t, (0, full_width - len(t))) for t in tables]).int()
    qsl = torch.tensor([0, *torch.tensor([n for _, n in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([c + n for c, n in seqs], dtype=torch.int32)
    # the reference takes [blocks, block_size, kv_heads, d]: the same memory, viewed with other strides
    ref = paged_attention_ref(
        q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), block_tables, qsl, seq_lens, scale
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)
