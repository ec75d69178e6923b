"""The KV contract (libs/kv_contract.py) and the cache salt, as pure logic: the one namespace
derivation, the gate that adopts or refuses a worker's contract, the router's refusal (logged and
counted) and its block size taken from the workers, and salted hashes that match between engine,
tokenizer-style hashing and the index while salted tenants share nothing (tests/mesh/test_kv_contract_mesh.py
runs the same on a real mesh)."""

import asyncio
import logging

from helpers import worker_stats
from prometheus_client import REGISTRY

from kvmesh.libs.bus import encode
from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, hash_seed, salted_extra_keys
from kvmesh.libs.engine.sampling_params import SamplingParams
from kvmesh.libs.kv_contract import ContractGate, hash_namespace, kv_contract
from kvmesh.libs.kv_event_feed import KVEventFeed
from kvmesh.libs.memory_index import MemoryBlockIndex
from kvmesh.schemas.kv_events import KVEventBatch
from kvmesh.schemas.messages import Heartbeat, KVContract, RouteRequest
from kvmesh.services.router.scoring import KVAwareScorer
from kvmesh.services.router.service import RouterConfig, RouterService
from kvmesh.services.sim_worker.core import SimCore, SimEngineConfig
from kvmesh.services.sim_worker.timing import TimingProfile

MODEL = "SmolLM2-135M-Instruct"
PROFILE = TimingProfile(
    prefill_base_s=0.0, prefill_s_per_token=0.0, decode_batch_sizes=[1], decode_step_s=[0.0]
)


def test_one_namespace_whatever_way_the_model_is_named():
    assert hash_namespace(MODEL) == MODEL
    assert hash_namespace(f"/models/{MODEL}") == hash_namespace(f"/models/{MODEL}/") == MODEL
    c = kv_contract(f"~/m/{MODEL}", 32)
    assert (c.block_size, c.hash_namespace, c.hash_seed) == (32, MODEL, hash_seed(None))


def test_the_gate_adopts_the_first_workers_block_size_and_refuses_other_contracts():
    adopted = []
    gate = ContractGate(MODEL, on_adopt=adopted.append)
    assert gate.contract is None and gate.block_size == 16  # nothing heard yet
    assert gate.check(None) is None  # a publisher without a contract: nothing to compare
    assert gate.check(kv_contract("other-model", 32)) == "hash_namespace"  # never adopted
    assert gate.check(kv_contract(MODEL, 32, seed=1)) == "hash_seed"
    assert gate.contract is None
    assert gate.check(kv_contract(MODEL, 32)) is None
    assert gate.block_size == 32 and adopted == [gate.contract]
    assert gate.check(kv_contract(MODEL, 16)) == "block_size"
    assert gate.check(KVContract(**{**_fields(kv_contract(MODEL, 32)), "version": 2})) == "version"
    pinned = ContractGate(MODEL, block_size=64)
    assert pinned.block_size == 64 and pinned.check(kv_contract(MODEL, 32)) == "block_size"


def _fields(c: KVContract) -> dict:
    return {f: getattr(c, f) for f in c.__struct_fields__}


def _beat(router: RouterService, wid: str, contract: KVContract | None) -> bool:
    stats = worker_stats(wid)
    stats.kv_contract = contract
    if not router.admit(stats):
        return False
    router.registry.beat(Heartbeat(stats=stats, ts=0.0, interval_s=1e6))
    return True


def _refused(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "kvmesh:router_workers_refused_total", {"model_name": "contract-test", "reason": reason}
    )
    return value or 0.0


def test_the_router_scores_in_the_workers_blocks_and_refuses_another_block_size_visibly(caplog):
    router = RouterService(
        RouterConfig(nats_url="", seed=0, model_name="contract-test", hash_namespace=MODEL)
    )
    before = _refused("block_size")
    assert _beat(router, "a", kv_contract(MODEL, 32)) and _beat(router, "b", kv_contract(MODEL, 32))
    assert isinstance(router.scorer, KVAwareScorer) and router.scorer.block_size == 32
    assert router.prefill_policy.block_size == 32
    with caplog.at_level(logging.WARNING, "kvmesh.services.router.service"):
        assert not _beat(router, "odd", kv_contract(MODEL, 16))
        assert not _beat(router, "odd", kv_contract(MODEL, 16))  # logged and counted once
    assert _refused("block_size") == before + 1
    assert [r.message for r in caplog.records if "refused worker odd" in r.message]
    assert "odd" not in router.registry.workers and router.refused == {"odd": "block_size"}
    # a taken worker that comes back hashing otherwise is dropped at once
    assert not _beat(router, "b", kv_contract(MODEL, 16)) and "b" not in router.registry.workers
    assert _beat(router, "b", kv_contract(MODEL, 32)) and "b" not in router.refused

    held = {"a": 3}

    async def overlap(_req):
        return held

    router.overlap = overlap
    # 100 tokens: 3 blocks of 32 cached; exact, as the engine counts them
    reply = asyncio.run(
        router.route(RouteRequest(request_id="r", num_tokens=100, max_tokens=1, block_size=32))
    )
    assert reply.worker_id == "a" and router.hit_tokens == 96
    # 96 tokens: the engine computes the last one, so only 2 of the 3 blocks are reused
    asyncio.run(router.route(RouteRequest(request_id="r", num_tokens=96, max_tokens=1, block_size=32)))
    assert router.hit_tokens == 96 + 64
    # hashed in blocks of 16 (a tokenizer that has not heard the workers): its overlap means nothing
    asyncio.run(router.route(RouteRequest(request_id="r", num_tokens=100, max_tokens=1, block_size=16)))
    assert router.hit_tokens == 96 + 64


def _run(core: SimCore, rid: str, tokens: list[int], salt: str | None) -> int:
    """Serve one request to completion; its prompt tokens served from the prefix cache."""
    core.add_request(rid, tokens, SamplingParams(max_tokens=1, temperature=0), salt)
    cached = None
    while core.has_unfinished_requests():
        for out in core.step().outputs:
            if out.finished:
                cached = out.num_cached_tokens
    core.check_integrity()
    return cached


def test_salted_tenants_share_no_block_and_the_index_derives_the_same_salted_keys():
    core = SimCore(SimEngineConfig(model=MODEL, block_size=32, num_kv_blocks=64), PROFILE)
    prompt = list(range(300, 300 + 100))  # 3 full blocks of 32
    assert _run(core, "plain-1", prompt, None) == 0
    assert _run(core, "plain-2", prompt, None) == 96  # unsalted requests still share
    assert _run(core, "a-1", prompt, "tenant-a") == 0  # salted: not the unsalted blocks
    assert _run(core, "b-1", prompt, "tenant-b") == 0  # nor another tenant's
    assert _run(core, "a-2", prompt, "tenant-a") == 96  # the same salt shares

    # the index re-derives each block's key from the events (the salt rides on the first block)
    index = MemoryBlockIndex(core.extra_keys, core.hash_seed)
    feed = KVEventFeed(index, gate=ContractGate(MODEL))
    batch = encode(KVEventBatch(ts=0.0, events=core.take_kv_events()))
    assert asyncio.run(feed.on_batch("w", 0, batch, core.kv_contract)) == "applied"
    index.check_integrity()

    def tokenizer_hashes(salt: str | None) -> list[int]:  # services/tokenizer's computation
        extra = encode_extra_keys(hash_namespace(MODEL))
        return hash_blocks(prompt, 32, extra, hash_seed(None), None, salted_extra_keys(extra, salt))

    for salt in (None, "tenant-a", "tenant-b"):
        assert index.overlap_now(tokenizer_hashes(salt)) == {"w": 3}, salt
    assert index.overlap_now(tokenizer_hashes("tenant-c")) == {}
    assert len({tokenizer_hashes(s)[-1] for s in (None, "tenant-a", "tenant-b")}) == 3

    # a worker hashing in other blocks is not indexed
    other = SimCore(SimEngineConfig(model=MODEL, block_size=16, num_kv_blocks=64), PROFILE)
    _run(other, "x", prompt, None)
    batch = encode(KVEventBatch(ts=0.0, events=other.take_kv_events()))
    assert asyncio.run(feed.on_batch("w16", 0, batch, other.kv_contract)) == "refused"
    assert "w16" not in index.blocks


def test_a_worker_refused_before_any_contract_is_adopted_is_refused_cleanly(caplog):
    config = RouterConfig(nats_url="", seed=0, model_name="contract-test", hash_namespace=MODEL)
    router = RouterService(config)
    with caplog.at_level(logging.WARNING, "kvmesh.services.router.service"):
        assert not _beat(router, "other", kv_contract("other-model", 32))
    assert router.gate.contract is None and router.refused == {"other": "hash_namespace"}
    assert "block_size=the first worker's" in caplog.text and "namespace='SmolLM2" in caplog.text
    assert _beat(router, "a", kv_contract(MODEL, 32)) and router.gate.block_size == 32
