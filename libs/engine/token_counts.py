"""The tokens a request has seen, kept for the penalties (logits_processors.py): its own state, held on
the request and updated with each step's new tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class TokenCounts:
    """The tokens one request has seen, sparse: each distinct token of its prompt proper and of its
    output, and how often it is in the output. Kept up to date incrementally (each step counts only the
    tokens appended since the previous one, usually one), and only as large as the tokens seen, so the
    penalties cost O(tokens seen) per row, not O(vocabulary)."""

    ids: torch.Tensor  # long [n]: the distinct tokens seen
    output_counts: torch.Tensor  # float32 [n]: occurrences of ids[i] in the output
    position: dict[int, int]  # token id -> its index in ids
    num_counted: int  # token_ids[:num_counted] are in the above

    @classmethod
    def of(cls, token_ids: list[int], output_start: int) -> TokenCounts:
        """The counts of a request whose output starts at `token_ids[output_start]` (a resumed
        request's earlier output, at the end of its prompt, counts as output)."""
        prompt_ids = sorted(set(token_ids[:output_start]))
        counts = cls(
            torch.tensor(prompt_ids, dtype=torch.long),
            torch.zeros(len(prompt_ids)),
            {t: i for i, t in enumerate(prompt_ids)},
            output_start,
        )
        counts.update(token_ids)
        return counts

    def update(self, token_ids: list[int]) -> None:
        new = token_ids[self.num_counted :]
        if not new:
            return
        added = []
        for t in new:
            if t not in self.position:
                self.position[t] = len(self.position)
                added.append(t)
        if added:
            self.ids = torch.cat([self.ids, torch.tensor(added, dtype=torch.long)])
            self.output_counts = torch.cat([self.output_counts, torch.zeros(len(added))])
        where = torch.tensor([self.position[t] for t in new], dtype=torch.long)
        self.output_counts.index_add_(0, where, torch.ones(len(new)))
        self.num_counted = len(token_ids)
