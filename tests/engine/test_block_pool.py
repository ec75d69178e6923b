import random

import pytest

from kvmesh.libs.engine.block_hash import BlockHash
from kvmesh.libs.engine.block_pool import BlockPool
from kvmesh.schemas.kv_events import AllBlocksCleared, BlockRemoved, BlockStored


def test_lru_reuse_and_lazy_eviction_events():
    pool = BlockPool(4, block_size=2)
    a = pool.get_new_blocks(2)
    pool.cache_full_blocks(a, [BlockHash(10), BlockHash(11)], parent=None, token_ids=[1, 2, 3, 4])
    assert pool.take_events() == [BlockStored([10, 11], None, [1, 2, 3, 4], 2)]
    pool.free_blocks(a[::-1])  # tail first: block with hash 11 is evicted before 10
    assert pool.num_free_blocks == 4 and pool.lookup(BlockHash(10)) is a[0]
    pool.check_integrity()
    # the two never-used blocks go first, then the cached ones in LRU order
    b = pool.get_new_blocks(3)
    assert [x.block_id for x in b[:2]] == [2, 3]
    assert b[2] is a[1] and pool.lookup(BlockHash(11)) is None
    assert pool.take_events() == [BlockRemoved([11])]
    pool.check_integrity()


def test_touching_a_cached_block_takes_it_off_the_free_list():
    pool = BlockPool(3, block_size=2)
    (a,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([a], [BlockHash(5)], None, [7, 8])
    pool.free_blocks([a])
    pool.touch([pool.lookup(BlockHash(5))])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.check_integrity()
    with pytest.raises(ValueError, match="asked for 3 blocks"):
        pool.get_new_blocks(3)


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(2, block_size=1)
    (a,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([a], [BlockHash(1)], None, [1])
    assert not pool.reset_prefix_cache()
    pool.free_blocks([a])
    pool.take_events()
    assert pool.reset_prefix_cache()
    assert pool.take_events() == [AllBlocksCleared()] and pool.lookup(BlockHash(1)) is None
    pool.check_integrity()


def test_randomized_operations_keep_integrity():
    rng = random.Random(0)
    pool = BlockPool(32, block_size=4)
    held: list[list] = []
    next_hash = 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.4 and pool.num_free_blocks:
            blocks = pool.get_new_blocks(rng.randint(1, min(4, pool.num_free_blocks)))
            if rng.random() < 0.7:
                hashes = [BlockHash(next_hash + i) for i in range(len(blocks))]
                next_hash += len(blocks)
                pool.cache_full_blocks(blocks, hashes, None, [0] * 4 * len(blocks))
            held.append(blocks)
        elif op < 0.6 and pool.cached:
            hit = pool.lookup(rng.choice(list(pool.cached)))
            pool.touch([hit])
            held.append([hit])
        elif held:
            blocks = held.pop(rng.randrange(len(held)))
            pool.free_blocks(blocks[::-1])
        pool.check_integrity()
    for blocks in held:
        pool.free_blocks(blocks)
    pool.check_integrity()
    assert pool.num_free_blocks == 32


def test_blocks_holding_no_prefix_are_reused_before_cached_ones():
    """A request's blocks come back tail first: the cached prefix joins the free list's tail (LRU),
    while its uncached last block (and a duplicate of a hash another block holds) joins the head, so
    the next allocations take those and evict no reusable prefix."""
    pool = BlockPool(6, block_size=2)
    a = pool.get_new_blocks(3)  # two full blocks and a partial one
    pool.cache_full_blocks(a[:2], [BlockHash(1), BlockHash(2)], None, [1, 2, 3, 4])
    dup = pool.get_new_blocks(1)  # the same first block computed twice: left uncached
    pool.cache_full_blocks(dup, [BlockHash(1)], None, [1, 2])
    pool.take_events()
    pool.free_blocks(a[::-1])
    pool.free_blocks(dup)
    pool.check_integrity()
    # 2 never-used blocks + 2 plain freed ones must go before either cached prefix block
    taken = pool.get_new_blocks(4)
    assert {b.block_id for b in taken} == {4, 5, a[2].block_id, dup[0].block_id}
    assert pool.lookup(BlockHash(1)) is a[0] and pool.lookup(BlockHash(2)) is a[1]
    assert pool.take_events() == []  # nothing evicted
    # then the cached ones, least recently freed first: the suffix (2) before the prefix (1)
    (next_one,) = pool.get_new_blocks(1)
    assert next_one is a[1] and pool.take_events() == [BlockRemoved([2])]
    pool.check_integrity()


def test_a_duplicate_block_is_listed_in_its_event_so_hashes_line_up_with_tokens():
    pool = BlockPool(4, block_size=2)
    first = pool.get_new_blocks(1)
    pool.cache_full_blocks(first, [BlockHash(1)], None, [1, 2])
    pool.take_events()
    both = pool.get_new_blocks(2)  # the same first block, then a new second one
    pool.cache_full_blocks(both, [BlockHash(1), BlockHash(2)], None, [1, 2, 3, 4], [("salt",), None])
    assert pool.take_events() == [BlockStored([1, 2], None, [1, 2, 3, 4], 2, extra_keys=[("salt",), None])]
    assert both[0].block_hash is None and pool.lookup(BlockHash(1)) is first[0]
    pool.check_integrity()
