"""Pure-torch paged attention: the reference for the Triton kernel and the engine's CPU path.

Same contract as `kvmesh.kernels.paged_attention.paged_attention`, written as a plain loop over
sequences so that it is obviously correct: gather the sequence's K/V from its blocks, build the
causal mask shifted by the cached prefix, softmax in fp32.
"""

import torch


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [num_tokens, H, D] attends causally over k_cache / v_cache [num_blocks, block_size, KVH, D].

    Query token i of sequence s sits at position seq_lens[s] - q_len + i and sees KV positions
    0..that position; KV position p of sequence s lives in block block_tables[s, p // block_size],
    slot p % block_size. Query head h reads kv head h // (H // KVH).
    """
    num_heads = q.shape[1]
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    queries_per_kv = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)

    starts = query_start_loc.tolist()
    for seq, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[seq], starts[seq + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[seq, :num_blocks].long()
        # [seq_len, num_heads, head_dim]: blocks laid end to end, kv heads repeated per GQA group.
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k = k.repeat_interleave(queries_per_kv, dim=1)
        v = v.repeat_interleave(queries_per_kv, dim=1)

        scores = torch.einsum("qhd,khd->hqk", q[q_start:q_end].float(), k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        kv_pos = torch.arange(seq_len, device=q.device)
        visible = kv_pos[None, :] <= q_pos[:, None]  # [q_len, seq_len]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out
