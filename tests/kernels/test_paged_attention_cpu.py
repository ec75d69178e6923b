"""The C++ CPU paged-attention kernel against the pure-torch reference, on the same poisoned random
paged batches as the Triton kernel (test_paged_attention.py): anything read outside a sequence's
live positions is NaN and fails the comparison. The extension's RMSNorm against torch's."""

import pytest
import torch
import torch.nn.functional as F
from pairwise import shape_matrix
from test_paged_attention import BATCHES, HEADS, SHAPES, TOLERANCES, assert_matches_reference, make_batch

from kvmesh.kernels.paged_attention_cpu import load, paged_attention_cpu, rms_norm_cpu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if load() is None:
        pytest.fail("the CPU kernel did not build (a C++ compiler is part of the install)")


@shape_matrix(
    {
        "batch_name": {name: name for name in BATCHES},
        "block_size,head_dim": SHAPES,
        "heads": HEADS,
        "head_major": {"engine-layout": True, "token-major": False},
        "dtype": DTYPES,
    }
)
def test_matches_reference(batch_name, block_size, head_dim, heads, head_major, dtype):
    q_lens, cached_lens = BATCHES[batch_name]
    batch = make_batch(
        q_lens,
        cached_lens,
        block_size=block_size,
        num_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=head_dim,
        dtype=dtype,
        device=torch.device("cpu"),
        head_major=head_major,
    )
    assert not batch.k_cache.is_contiguous()
    assert_matches_reference(batch, paged_attention_cpu(*batch))


def smollm_batch(q_lens: list[int], cached_lens: list[int]):
    """fp32, SmolLM2's heads (9 query, 3 kv, head_dim 64), 16-token blocks, the engine's layout."""
    return make_batch(
        q_lens, cached_lens, block_size=16, num_heads=9, num_kv_heads=3, head_dim=64,
        dtype=torch.float32, device=torch.device("cpu"), head_major=True,
    )  # fmt: skip


def test_writes_into_a_strided_out_and_leaves_other_rows():
    batch = smollm_batch([1, 1, 3], [30, 0, 12])
    wide = torch.full((batch.q.shape[0], 9, 2, 64), 7.0)  # out rows with a stride of 2 * 64 per head
    out = wide[:, :, 0]
    paged_attention_cpu(*batch, out=out)
    assert torch.equal(wide[:, :, 1], torch.full_like(wide[:, :, 1], 7.0))
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out, paged_attention_cpu(*batch), atol=tol, rtol=tol)


def test_rejects_a_block_table_too_short_for_its_sequence():
    batch = smollm_batch([1], [40])
    short = batch._replace(block_tables=batch.block_tables[:, :2].contiguous())  # 41 tokens need 3
    with pytest.raises(RuntimeError, match="block table too short"):
        paged_attention_cpu(*short)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rms_norm_matches_torch(dtype, rows):
    torch.manual_seed(rows)
    x = torch.randn(rows, 576, dtype=dtype) * 3
    w = torch.randn(576, dtype=dtype)
    ref = F.rms_norm(x.float(), (576,), w.float(), 1e-5)
    got = rms_norm_cpu(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    # one rounding to the output dtype, as torch's op: no larger error than torch's own
    torch_err = (F.rms_norm(x, (576,), w, 1e-5).float() - ref).abs().max().item()
    assert (got.float() - ref).abs().max().item() <= max(torch_err, 1e-5) * 1.01


def test_rms_norm_falls_back_on_strided_input():
    x = torch.randn(8, 2 * 576)[:, ::2]  # not contiguous
    w = torch.randn(576)
    torch.testing.assert_close(rms_norm_cpu(x, w, 1e-6), F.rms_norm(x, (576,), w, 1e-6))
