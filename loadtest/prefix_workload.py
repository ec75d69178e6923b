"""The multi-tenant shared-prefix workload of prefix_bench.py, as a fixed trace.

`groups` tenants each have a long system prompt; each of their `users_per_group` users has a short
context of their own (a profile, earlier turns) and asks a fresh question every time:

    prompt = system[group] + context[group][user] + question      (token ids, no tokenizer needed)

Requests arrive as a Poisson process whose rate steps up (`rates`, `step_s` each), group and user
uniform at random. The whole trace (prompts, block hashes, arrival times) is built up front from a
seed, so that every routing policy is measured on exactly the same requests at the same times.
Each request also carries its `ideal` cached tokens: the longest prefix any earlier request had
(in full blocks, at least one token left to compute), which an infinitely large cache would hold.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, hash_seed
from kvmesh.libs.kv_contract import hash_namespace

TOKEN_LO, TOKEN_HI = 1000, 40000  # ordinary tokens of SmolLM2's vocabulary (no special ids)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    groups: int = 50
    system_tokens: int = 1968  # 123 blocks; with context and question, 2,048 tokens = 128 blocks
    users_per_group: int = 8
    user_tokens: int = 32
    question_tokens: int = 48
    output_tokens: int = 16
    rates: tuple[float, ...] = (5.0, 10.0, 15.0, 20.0)  # requests/s of each step
    step_s: float = 15.0
    block_size: int = 16
    model: str = "SmolLM2-135M-Instruct"  # the block-hash namespace
    seed: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.system_tokens + self.user_tokens + self.question_tokens


@dataclass(frozen=True, slots=True)
class TraceRequest:
    index: int
    arrival_s: float  # since the start of the run
    step: int  # which rate step it arrived in
    group: int
    user: int
    token_ids: list[int]
    block_hashes: list[int]
    ideal_cached_tokens: int

    @property
    def session_id(self) -> str:
        return f"g{self.group}-u{self.user}"


def build_trace(spec: WorkloadSpec) -> list[TraceRequest]:
    rng = random.Random(spec.seed)
    bs = spec.block_size
    extra = encode_extra_keys(hash_namespace(spec.model))
    seed = hash_seed(None)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(n)]

    systems = [tokens(spec.system_tokens) for _ in range(spec.groups)]
    system_hashes = [hash_blocks(s, bs, extra, seed) for s in systems]
    contexts = [[tokens(spec.user_tokens) for _ in range(spec.users_per_group)] for _ in range(spec.groups)]
    aligned = spec.system_tokens % bs == 0  # then the rest of the prompt hashes on from the system's
    seen_groups: set[int] = set()
    seen_users: set[tuple[int, int]] = set()
    trace: list[TraceRequest] = []
    t = 0.0
    for step, rate in enumerate(spec.rates):
        end = (step + 1) * spec.step_s
        t = max(t, step * spec.step_s)
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                t = end
                break
            g, u = rng.randrange(spec.groups), rng.randrange(spec.users_per_group)
            prompt = systems[g] + contexts[g][u] + tokens(spec.question_tokens)
            if aligned and system_hashes[g]:
                rest = hash_blocks(prompt[spec.system_tokens :], bs, extra, seed, parent=system_hashes[g][-1])
                hashes = system_hashes[g] + rest
            else:
                hashes = hash_blocks(prompt, bs, extra, seed)
            if (g, u) in seen_users:
                ideal = spec.system_tokens + spec.user_tokens
            elif g in seen_groups:
                ideal = spec.system_tokens
            else:
                ideal = 0
            ideal = min(ideal // bs, (len(prompt) - 1) // bs) * bs
            seen_groups.add(g)
            seen_users.add((g, u))
            trace.append(TraceRequest(len(trace), t, step, g, u, prompt, hashes, ideal))
    return trace
