import subprocess
import sys

from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, root_hash

SEED = 1234
EXTRA = encode_extra_keys("m")


def test_only_full_blocks_are_hashed_and_chained():
    tokens = list(range(40))
    hashes = hash_blocks(tokens, 16, EXTRA, SEED)
    assert len(hashes) == 2
    # a chained hash names the whole prefix: same block tokens after a different prefix differ
    other = hash_blocks([99] * 16 + tokens[16:32], 16, EXTRA, SEED)
    assert other[1] != hashes[1]
    # continuing from a parent equals hashing the whole sequence
    assert hash_blocks(tokens[16:32], 16, EXTRA, SEED, parent=hashes[0]) == hashes[1:]


def test_namespaces_and_seeds_do_not_collide():
    tokens = list(range(32))
    base = hash_blocks(tokens, 16, EXTRA, SEED)
    assert hash_blocks(tokens, 16, encode_extra_keys("other-model"), SEED) != base
    assert hash_blocks(tokens, 16, encode_extra_keys("m", cache_salt="tenant-a"), SEED) != base
    assert hash_blocks(tokens, 16, EXTRA, SEED + 1) != base
    assert root_hash(SEED) != root_hash(SEED + 1)


def test_identical_in_another_process():
    """No salted hash(): a fresh interpreter (new PYTHONHASHSEED) computes the same values."""
    tokens = list(range(1000, 1064))
    code = (
        "from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks;"
        f"print(hash_blocks({tokens}, 16, encode_extra_keys('m'), {SEED}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "77"}
    )
    assert out.stdout.strip() == str(hash_blocks(tokens, 16, EXTRA, SEED))
