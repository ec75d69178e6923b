"""The kernels' pairwise shape selection covers every value pair (pure logic)."""

import itertools

import pytest
from pairwise import all_pairs


@pytest.mark.parametrize("sizes", [[5, 2, 2, 2], [5, 2, 2, 2, 3], [3, 3, 3], [4], [2, 7]])
def test_every_pair_of_values_is_covered(sizes):
    chosen = all_pairs([list(range(n)) for n in sizes])
    for a, b in itertools.combinations(range(len(sizes)), 2):
        for i in range(sizes[a]):
            for j in range(sizes[b]):
                assert any(c[a] == i and c[b] == j for c in chosen), (a, i, b, j)
    for a, n in enumerate(sizes):
        assert {c[a] for c in chosen} == set(range(n))
    assert len(chosen) <= sum(1 for _ in itertools.product(*(range(n) for n in sizes)))


def test_the_shape_matrices_shrink_to_their_lower_bound():
    # the product of the two largest dimensions is the least any pairwise set can have
    assert len(all_pairs([range(5), range(2), range(2), range(2)])) == 10
    assert len(all_pairs([range(5), range(2), range(2), range(2), range(3)])) == 15
