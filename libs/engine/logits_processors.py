"""What a request's parameters do to its logits before sampling: logit_bias, the three penalties, min_p.

Each is batched over the rows that ask for it and costs nothing when no row does. The definitions are
vLLM's (frequency and presence are OpenAI's too):
- logit_bias: the bias is added to the token's logit.
- repetition_penalty r: a token seen in the prompt or the output has a positive logit divided by r,
  a negative one multiplied by r.
- frequency_penalty f, presence_penalty p: logit -= f * (times the token is in the output) + p * (1 if
  it is in the output at all).
- min_p m (after temperature): tokens less likely than m x the most likely token are dropped.
"Output" is what the request generated: a migrated request's earlier output, the last
`resumed_tokens` tokens of its prompt, counts as output too.
"""

from __future__ import annotations

import torch

from kvmesh.libs.engine.request import Request
from kvmesh.libs.engine.token_counts import TokenCounts


def apply_logit_bias(logits: torch.Tensor, reqs: list[Request]) -> None:
    """In place: each row's logit_bias added to its logits."""
    rows: list[int] = []
    tokens: list[int] = []
    biases: list[float] = []
    for i, req in enumerate(reqs):
        bias = req.params.logit_bias
        if bias:
            rows.extend([i] * len(bias))
            tokens.extend(bias)
            biases.extend(bias.values())
    if rows:
        index = (torch.tensor(rows), torch.tensor(tokens))
        logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype), accumulate=True)


def apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
    """In place: repetition, frequency and presence penalties on the rows whose request has any
    (their TokenCounts are created on first use and kept on the request). Only the tokens each row has
    seen change, so all rows' seen tokens are gathered, penalised and scattered back at once."""
    rows = [i for i, req in enumerate(reqs) if req.params.has_penalties]
    if not rows:
        return
    counts = []
    for i in rows:
        req = reqs[i]
        if req.token_counts is None:
            output_start = req.num_prompt_tokens - req.params.resumed_tokens
            req.token_counts = TokenCounts.of(req.token_ids, output_start)
        else:
            req.token_counts.update(req.token_ids)
        counts.append(req.token_counts)
    lengths = torch.tensor([len(c.position) for c in counts])
    params = [reqs[i].params for i in rows]

    def per_entry(values: list[float]) -> torch.Tensor:
        return torch.tensor(values).repeat_interleave(lengths)

    index = (torch.tensor(rows).repeat_interleave(lengths), torch.cat([c.ids for c in counts]))
    output = torch.cat([c.output_counts for c in counts])
    repetition = per_entry([p.repetition_penalty for p in params])  # every entry is a seen token
    x = logits[index]
    x = torch.where(x > 0, x / repetition, x * repetition)
    x -= per_entry([p.frequency_penalty for p in params]) * output
    x -= per_entry([p.presence_penalty for p in params]) * (output > 0)
    logits[index] = x


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Logits with every token less likely than min_p x its row's most likely token set to -inf
    (min_p: [rows]; 0 keeps the row as it is)."""
    probs = torch.softmax(logits, -1)
    threshold = min_p.unsqueeze(1) * probs.amax(-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))
