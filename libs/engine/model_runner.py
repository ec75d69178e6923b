"""Turns a scheduled step into tensors, runs the model over the flat token batch, samples.

Rows are laid out decodes first (one token each, batched through one attention call), then prefill
chunks, then padding rows up to the step's token bucket (step_shapes.py: few distinct shapes keep the
oneDNN shape caches, and so the worker's memory, bounded). Only rows that end a request's known
tokens produce logits: the vocabulary projection is skipped for every other prompt token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvmesh.kernels import paged_attention_cpu as cpu_kernel
from kvmesh.libs.engine.attention import AttentionMetadata, DecodeGather, DecodeKernelArgs, PrefillChunk
from kvmesh.libs.engine.llama import LlamaModel
from kvmesh.libs.engine.request import Request
from kvmesh.libs.engine.sampler import Sampler, SampleResult
from kvmesh.libs.engine.scheduler import SchedulerOutput
from kvmesh.libs.engine.step_shapes import StepBuckets, bucket


class StepResult(NamedTuple):
    requests: list[Request]  # the requests that got a new token, in row order
    sample: SampleResult


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,
        block_size: int,
        buckets: StepBuckets | None = None,
        cpu_attention_kernel: bool = True,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.buckets = buckets or StepBuckets()
        self.sampler = Sampler(model.cfg.vocab_size)
        self.decode_gather = DecodeGather()
        # decode attention through the C++ kernel where it builds (attention.py), else the torch path
        self.decode_kernel = (
            cpu_attention_kernel and kv_cache.device.type == "cpu" and cpu_kernel.load() is not None
        )
        if self.decode_kernel:  # the same extension's RMSNorm: one pass per row instead of several ops
            model.rms_norm = cpu_kernel.rms_norm_cpu

    def build(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slot_block: list[int] = []
        logit_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        for s in out.decodes:
            req = s.request
            p = req.num_computed_tokens
            ids.append(req.token_ids[p])
            positions.append(p)
            table = [b.block_id for b in req.blocks]
            slot_block.append(table[p // bs])
            decode_tables.append(table)
            decode_lens.append(p + 1)
            logit_rows.append(len(ids) - 1)
        prefills: list[PrefillChunk] = []
        for s in out.prefills:
            req = s.request
            c, n = req.num_computed_tokens, s.num_new_tokens
            table = [b.block_id for b in req.blocks]
            prefills.append(PrefillChunk(len(ids), n, c, torch.tensor(table[: -(-(c + n) // bs)])))
            ids.extend(req.token_ids[c : c + n])
            positions.extend(range(c, c + n))
            slot_block.extend(table[p // bs] for p in range(c, c + n))
            if s.samples:
                logit_rows.append(len(ids) - 1)

        num_tokens = len(ids)
        slot_offset = torch.tensor(positions) % bs
        padding = bucket(num_tokens, self.buckets.tokens) - num_tokens
        ids.extend([0] * padding)
        positions.extend([0] * padding)
        decode_block_tables = decode_bias = decode_k = decode_v = decode_kernel = None
        if decode_tables and self.decode_kernel:
            width = max(len(t) for t in decode_tables)
            decode_kernel = DecodeKernelArgs(
                torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.int32),
                torch.arange(len(decode_tables) + 1, dtype=torch.int32),
                torch.tensor(decode_lens, dtype=torch.int32),
            )
        elif decode_tables:
            width = max(len(t) for t in decode_tables)
            decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables])
            seqs = bucket(len(decode_tables), self.buckets.decode_seqs)
            ctx = bucket(width, self.buckets.decode_blocks) * bs
            lens = torch.tensor(decode_lens + [ctx] * (seqs - len(decode_lens)))
            pad = torch.arange(ctx).unsqueeze(0) >= lens.unsqueeze(1)
            decode_bias = torch.zeros(pad.shape).masked_fill_(pad, float("-inf")).view(1, seqs, 1, ctx)
            cfg = self.model.cfg
            decode_k, decode_v = self.decode_gather.buffers(
                cfg.num_kv_heads, seqs, ctx, cfg.head_dim, self.kv_cache.dtype
            )
        meta = AttentionMetadata(
            slot_block=torch.tensor(slot_block),
            slot_offset=slot_offset,
            num_decode=len(out.decodes),
            decode_block_tables=decode_block_tables,
            decode_bias=decode_bias,
            prefills=prefills,
            decode_k=decode_k,
            decode_v=decode_v,
            decode_kernel=decode_kernel,
        )
        if logit_rows:  # padding rows of the lm head repeat the first row
            logit_rows += logit_rows[:1] * (
                bucket(len(logit_rows), self.buckets.logit_rows) - len(logit_rows)
            )
        return torch.tensor(ids), torch.tensor(positions), meta, logit_rows

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        input_ids, positions, meta, logit_rows = self.build(out)
        hidden = self.model.forward(input_ids, positions, self.kv_cache, meta)
        reqs = [s.request for s in out.decodes] + [s.request for s in out.prefills if s.samples]
        if not reqs:
            return StepResult([], SampleResult([], []))
        logits = self.model.compute_logits(hidden[logit_rows])[: len(reqs)]
        sample = self.sampler(logits, reqs)
        return StepResult(reqs, sample)
