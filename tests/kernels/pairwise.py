"""Pairwise (all-pairs) selection of a parameter matrix: every value of every dimension, and every
pair of values of any two dimensions, appears in at least one chosen case.

The kernels' shape matrices multiply five or six dimensions (batch kind, block size x head dim, head
grouping, layout, dtype): the full product is 40-120 cases per kernel, most of them re-testing pairs
already covered. Under the Triton interpreter, on a CPU, the tests take the pairwise subset (10-15
cases); with a GPU (`TRITON_INTERPRET=0`) or `KVMESH_FULL_KERNEL_MATRIX=1` they take the full product.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import pytest


def all_pairs(dimensions: Sequence[Sequence[object]]) -> list[tuple[int, ...]]:
    """Index tuples (one index per dimension) covering every pair of values: greedy, deterministic,
    picking each time the combination that covers the most pairs not yet covered."""
    sizes = [len(d) for d in dimensions]
    # a value alone counts as the pair (a, i, a, i): a one-dimension matrix still takes every value
    uncovered = {
        (a, i, b, j)
        for a, b in itertools.combinations_with_replacement(range(len(sizes)), 2)
        for i in range(sizes[a])
        for j in range(sizes[b])
        if a != b or i == j
    }
    candidates = list(itertools.product(*(range(n) for n in sizes)))
    chosen: list[tuple[int, ...]] = []

    def pairs(combo: tuple[int, ...]) -> set[tuple[int, int, int, int]]:
        dims = itertools.combinations_with_replacement(range(len(combo)), 2)
        return {(a, combo[a], b, combo[b]) for a, b in dims}

    while uncovered:
        best = max(candidates, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def full_matrix() -> bool:
    on_gpu = os.environ.get("TRITON_INTERPRET", "1") == "0"
    return on_gpu or os.environ.get("KVMESH_FULL_KERNEL_MATRIX") == "1"


def shape_matrix(dimensions: dict[str, dict[str, object]]) -> pytest.MarkDecorator:
    """`@pytest.mark.parametrize` over the dimensions (argnames -> {case id: value}): the pairwise
    subset on a CPU, the full product where `full_matrix()`; case ids join the dimensions' ids."""
    names = list(dimensions)
    ids_per_dim = [list(d) for d in dimensions.values()]
    if full_matrix():
        combos = list(itertools.product(*(range(len(ids)) for ids in ids_per_dim)))
    else:
        combos = all_pairs(ids_per_dim)
    values = []
    for combo in combos:
        row: list[object] = []
        for k, i in enumerate(combo):
            value = dimensions[names[k]][ids_per_dim[k][i]]
            # a dimension named "a,b" carries (a, b) tuples, as in pytest.mark.parametrize
            row.extend(value if "," in names[k] else [value])
        values.append(tuple(row))
    ids = ["-".join(ids_per_dim[k][i] for k, i in enumerate(c)) for c in combos]
    return pytest.mark.parametrize(",".join(names), values, ids=ids)
