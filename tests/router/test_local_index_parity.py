"""The router's in-memory replica of the block index against the kv-index's Redis index: fed the same
KV event batches through the same KVEventFeed (stores, removals, clears, repeated batches, sequence
gaps, publisher hashes that are not ours), both answer the same overlap for every prompt."""

import random
import time

from redis.asyncio import Redis

from kvmesh.libs.bus import encode
from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, hash_seed
from kvmesh.libs.kv_event_feed import KVEventFeed
from kvmesh.libs.memory_index import MemoryBlockIndex
from kvmesh.schemas.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvmesh.services.kv_index.index import KVIndex

BS = 4
WORKERS = ["w0", "w1", "w2", "w3"]


def prompt(tree: int, branch: int, blocks: int) -> list[int]:
    """Prompts of one tree share their first 3 blocks, then branch."""
    return [tree * 1000 + (i if i < 3 * BS else branch * 100 + i) for i in range(blocks * BS)]


class Publisher:
    """One worker's events the way a publisher sends them: its own hashes (ours xor a salt, as a
    foreign engine would have), per-worker sequence numbers."""

    def __init__(self, rng: random.Random, worker: str, extra: bytes, seed: int) -> None:
        self.rng, self.worker, self.extra, self.seed = rng, worker, extra, seed
        self.salt = rng.getrandbits(60)
        self.held: set[int] = set()  # our keys of its cached blocks
        self.seq = 0

    def events(self) -> list:
        roll = self.rng.random()
        if roll < 0.6:
            tokens = prompt(self.rng.randrange(3), self.rng.randrange(3), self.rng.randint(1, 8))
            keys = hash_blocks(tokens, BS, self.extra, self.seed)
            start = self.rng.randrange(len(keys))  # a chain continued from a held (or evicted) parent
            self.held.update(keys[start:])
            return [
                BlockStored(
                    block_hashes=[k ^ self.salt for k in keys[start:]],
                    parent_block_hash=keys[start - 1] ^ self.salt if start else None,
                    token_ids=tokens[start * BS :],
                    block_size=BS,
                )
            ]
        if roll < 0.9 and self.held:
            gone = self.rng.sample(sorted(self.held), min(len(self.held), self.rng.randint(1, 3)))
            self.held.difference_update(gone)
            return [BlockRemoved(block_hashes=[k ^ self.salt for k in gone])]
        self.held.clear()
        return [AllBlocksCleared()]

    def next_seq(self) -> int:
        roll = self.rng.random()
        if roll < 0.05 and self.seq > 1:
            return self.seq - 1  # a batch published again (a retry after a lost ack)
        if roll < 0.1:
            self.seq += 2  # a batch lost: a gap
        seq, self.seq = self.seq, self.seq + 1
        return seq


async def test_memory_and_redis_indexes_answer_alike_for_the_same_events(redis_url):
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    extra, seed = encode_extra_keys("m"), hash_seed(None)
    memory = MemoryBlockIndex(extra, seed)
    feeds = [KVEventFeed(memory), KVEventFeed(KVIndex(redis, extra, seed))]
    rng = random.Random(7)
    publishers = [Publisher(rng, w, extra, seed) for w in WORKERS]
    queries = [hash_blocks(prompt(t, b, 8), BS, extra, seed) for t in range(3) for b in range(3)]
    outcomes = set()
    for step in range(300):
        pub = rng.choice(publishers)
        data = encode(KVEventBatch(ts=time.time(), events=pub.events()))
        seq = pub.next_seq()
        for feed in feeds:
            outcomes.add(await feed.on_batch(pub.worker, seq, data))
        if step % 20 == 19:
            memory.check_integrity()
            for q in queries:
                assert memory.overlap_now(q) == await feeds[1].index.overlap(q), (step, q[0])
    assert {"applied", "resynced", "repeated"} <= outcomes, "every path of the feed was taken"
    assert feeds[0].resyncs == feeds[1].resyncs > 0
    assert any(memory.overlap_now(q) for q in queries), "the index is not trivially empty"
    await redis.aclose()
