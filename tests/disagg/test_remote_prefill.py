"""Both sides of a remote prefill in one process: two engines (tiny model), their real NIXL agents,
real NATS. Covers the protocol's paths that are hard to provoke across processes: a failing
transfer is retried once then falls back, leases expire, aborts return reserved blocks."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
from prometheus_client import REGISTRY

from kvmesh.libs.bus import Bus, decode
from kvmesh.libs.engine.async_engine import AsyncLLM
from kvmesh.libs.engine.config import EngineConfig
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.libs.engine.sampling_params import SamplingParams
from kvmesh.libs.kv_transfer.agent import KVTransferAgent, TransferError
from kvmesh.schemas.messages import (
    AbortRequest,
    Finished,
    GenerateAccepted,
    GenerateRequest,
    GenerateResult,
    SamplingOptions,
    StatsRequest,
    StreamMessage,
    Subjects,
    TokenChunk,
    WorkerStats,
)
from kvmesh.schemas.transfer import PrefillRequest, PrefillResult
from kvmesh.services.worker.disagg import DisaggConfig
from kvmesh.services.worker.service import WorkerConfig, WorkerService

BLOCK = 16


def engine_config(model) -> EngineConfig:
    return EngineConfig(model=str(model), dtype="float32", block_size=BLOCK, num_kv_blocks=96)


class Pair:
    """A prefill worker and a decode worker, each a WorkerService on its own bus connection."""

    async def start(self, nats_url: str, model, lease_s: float = 30.0) -> Pair:
        self.services, self.buses = {}, []
        for wid, role in (("p0", "prefill"), ("d0", "decode")):
            llm = AsyncLLM(lambda: LLMEngine(engine_config(model), load_tokenizer=False))
            engine = await llm.ready()
            agent = KVTransferAgent(wid, engine.kv_cache, "tiny")
            await agent.start()
            config = WorkerConfig(nats_url=nats_url, worker_id=wid, model="tiny", role=role)
            disagg = DisaggConfig(lease_s=lease_s, liveness_interval_s=0.5)
            service = WorkerService(config, llm, agent, disagg)
            bus = await Bus.connect(nats_url, wid)
            await service.attach(bus)
            self.services[wid] = service
            self.buses.append(bus)
        self.client = await Bus.connect(nats_url, "client")
        return self

    @property
    def decode(self) -> WorkerService:
        return self.services["d0"]

    @property
    def prefill(self) -> WorkerService:
        return self.services["p0"]

    async def generate(
        self, rid: str, tokens: list[int], max_tokens: int = 8, remote: bool = True, salt: str | None = None
    ) -> list[int]:
        req = GenerateRequest(
            request_id=rid,
            token_ids=tokens,
            sampling=SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True),
            stream_subject=Subjects.stream(rid),
            prefill_worker_id="p0" if remote else None,
            cache_salt=salt,
        )
        sub, stream = await self.client.subscribe_queue(req.stream_subject)
        reply = await self.client.request(Subjects.worker("d0", "generate"), req, GenerateResult)
        assert isinstance(reply, GenerateAccepted), reply
        out: list[int] = []
        while True:
            msg = decode((await asyncio.wait_for(stream.get(), 30)).data, StreamMessage)
            if isinstance(msg, TokenChunk):
                assert msg.first_index == len(out)
                out += msg.token_ids
            else:
                assert isinstance(msg, Finished), msg
                break
        await sub.unsubscribe()
        return out

    async def stats(self, wid: str) -> WorkerStats:
        ask = StatsRequest(check_integrity=True)
        return await self.client.request(Subjects.worker(wid, "stats"), ask, WorkerStats)

    async def close(self) -> None:
        for service in self.services.values():
            with contextlib.suppress(Exception):  # a test may have taken a worker off NATS already
                await service.drain(5)
            service.llm.shutdown()
            service.agent.close()
        for bus in [*self.buses, self.client]:
            with contextlib.suppress(Exception):
                await bus.close()


@pytest.fixture
async def pair(nats_url, tiny_model_path):
    p = await Pair().start(nats_url, tiny_model_path, lease_s=1.0)
    yield p
    await p.close()


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """Greedy output of an aggregated engine of its own (no prefix cache shared with the pair)."""
    engine = LLMEngine(engine_config(tiny_model_path), load_tokenizer=False)
    counter = iter(range(10**6))

    def run(tokens: list[int]) -> list[int]:
        rid = f"ref-{next(counter)}"
        engine.add_request(rid, tokens, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        out: list[int] = []
        while engine.has_unfinished_requests():
            out += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
        return out

    return run


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 500) for _ in range(n)]


async def assert_clean(pair: Pair) -> None:
    for wid in ("p0", "d0"):
        s = await pair.stats(wid)
        assert s.integrity_error is None, (wid, s.integrity_error)
        assert s.num_leased_blocks == 0 and s.num_free_blocks == s.num_blocks, (wid, s)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"model_name": "tiny", "worker_id": "d0", **labels}) or 0.0


async def test_remote_prefill_pulls_only_missing_blocks_and_matches_local(pair, reference):
    rng = random.Random(1)
    metrics = (
        "kvmesh:kv_transfer_blocks_total",
        "kvmesh:kv_transfer_bytes_total",
        "kvmesh:kv_transfer_seconds_count",
    )
    before = [sample(m) for m in metrics] + [sample("kvmesh:prefill_requests_total", where="remote")]
    shared = prompt(rng, 5 * BLOCK)
    first = shared + prompt(rng, 3 * BLOCK + 5)  # 8 full blocks + a partial one
    assert await pair.generate("r1", first) == reference(first)
    s1 = await pair.stats("d0")
    assert (s1.remote_prefills, s1.kv_blocks_pulled, s1.local_prefill_fallbacks) == (1, 8, 0)
    after = [sample(m) for m in metrics] + [sample("kvmesh:prefill_requests_total", where="remote")]
    assert [a - b for a, b in zip(after, before, strict=True)] == [8, s1.kv_bytes_pulled, 1, 1]

    second = shared + prompt(rng, 2 * BLOCK + 3)  # shares 5 blocks the decode worker now holds
    assert await pair.generate("r2", second) == reference(second)
    s2 = await pair.stats("d0")
    assert s2.remote_prefills == 2
    assert s2.kv_blocks_pulled - s1.kv_blocks_pulled == 2, "only the 2 blocks not cached locally"

    short = prompt(rng, BLOCK - 3)  # no full block: nothing to pull, prefilled locally
    assert await pair.generate("r3", short) == reference(short)
    assert (await pair.stats("d0")).remote_prefills == 2
    await assert_clean(pair)


async def test_a_salted_prompt_is_prefilled_and_pulled_under_its_salt(pair, reference):
    """Both sides hash a salted prompt's blocks with its salt: the tenant's blocks are found by the
    same salt only, on the prefill worker and on the decode worker, never by an unsalted prompt."""
    prefix = prompt(random.Random(5), 4 * BLOCK)
    tokens = [*prefix, 7, 8, 9]
    assert await pair.generate("s1", tokens, salt="tenant-a") == reference(tokens)
    assert (await pair.stats("d0")).kv_blocks_pulled == 4
    for service in (pair.prefill, pair.decode):

        def held(salt, service=service):
            return service.llm.call(lambda e: e.num_cached_prefix_blocks(prefix, salt))

        assert (await held("tenant-a"), await held(None), await held("tenant-b")) == (4, 0, 0)
    await assert_clean(pair)


async def test_failed_transfer_is_retried_once_then_falls_back(pair, reference, monkeypatch):
    rng = random.Random(2)
    agent = pair.decode.agent
    real_pull = agent.pull
    failures = {"left": 1}

    async def flaky_pull(*args, **kwargs):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise TransferError("injected")
        return await real_pull(*args, **kwargs)

    monkeypatch.setattr(agent, "pull", flaky_pull)
    once = prompt(rng, 6 * BLOCK + 1)
    assert await pair.generate("f1", once) == reference(once)
    s = await pair.stats("d0")
    assert (s.remote_prefills, s.local_prefill_fallbacks, s.kv_blocks_pulled) == (1, 0, 6), "retry succeeded"

    failures["left"] = 2
    twice = prompt(rng, 6 * BLOCK + 1)
    assert await pair.generate("f2", twice) == reference(twice)
    s = await pair.stats("d0")
    assert (s.remote_prefills, s.local_prefill_fallbacks, s.kv_blocks_pulled) == (1, 1, 6), "fell back"
    await assert_clean(pair)


async def test_unreleased_lease_expires(pair):
    rng = random.Random(3)
    reply = await pair.client.request(
        Subjects.worker("p0", "prefill"),
        PrefillRequest(request_id="orphan", token_ids=prompt(rng, 4 * BLOCK)),
        PrefillResult,
    )
    assert len(reply.block_ids) == 4
    assert (await pair.stats("p0")).num_leased_blocks == 4
    for _ in range(40):  # lease_s is 1 s here; the expiry loop runs every 0.25 s
        await asyncio.sleep(0.1)
        if (await pair.stats("p0")).num_leased_blocks == 0:
            break
    assert pair.prefill.prefill_server.num_expired == 1
    await assert_clean(pair)


async def test_prefill_worker_gone_falls_back_to_local(pair, reference):
    rng = random.Random(4)
    await pair.buses[0].close()  # the prefill worker is off NATS: its subjects have no responders
    tokens = prompt(rng, 5 * BLOCK + 2)
    assert await pair.generate("gone", tokens) == reference(tokens)
    s = await pair.stats("d0")
    assert (s.remote_prefills, s.local_prefill_fallbacks) == (0, 1)


async def test_randomized_remote_and_local_requests_leave_no_block_behind(pair):
    rng = random.Random(5)
    prefixes = [prompt(rng, rng.randrange(1, 4) * BLOCK) for _ in range(3)]
    jobs = []
    for i in range(12):
        tokens = rng.choice(prefixes) + prompt(rng, rng.randrange(1, 3 * BLOCK))
        jobs.append(pair.generate(f"x{i}", tokens, max_tokens=rng.randrange(1, 6), remote=rng.random() < 0.8))
    outs = await asyncio.gather(*jobs)
    assert all(outs)
    await assert_clean(pair)


async def test_abort_during_the_remote_phase_returns_every_block(pair, monkeypatch):
    """The client leaves while the blocks are on their way: the reservation goes back, the prefill
    worker's lease is released, nothing is streamed, nothing leaks."""
    agent = pair.decode.agent
    real_pull = agent.pull
    entered = asyncio.Event()

    async def slow_pull(*args, **kwargs):
        entered.set()
        await asyncio.sleep(2)
        return await real_pull(*args, **kwargs)

    monkeypatch.setattr(agent, "pull", slow_pull)
    rng = random.Random(6)
    req = GenerateRequest(
        request_id="leaver",
        token_ids=prompt(rng, 6 * BLOCK + 1),
        sampling=SamplingOptions(max_tokens=4, temperature=0, ignore_eos=True),
        stream_subject=Subjects.stream("leaver"),
        prefill_worker_id="p0",
    )
    _sub, stream = await pair.client.subscribe_queue(req.stream_subject)
    assert isinstance(
        await pair.client.request(Subjects.worker("d0", "generate"), req, GenerateResult), GenerateAccepted
    )
    await asyncio.wait_for(entered.wait(), 10)
    assert (await pair.stats("d0")).num_leased_blocks == 6, "the pull targets are reserved"
    await pair.client.publish(Subjects.worker("d0", "abort"), AbortRequest(request_id="leaver"))
    for _ in range(50):
        await asyncio.sleep(0.05)
        d, p = await pair.stats("d0"), await pair.stats("p0")
        if d.num_leased_blocks == 0 and p.num_leased_blocks == 0:
            break
    assert stream.empty(), "an aborted request streams nothing"
    assert "leaver" not in pair.decode._pumps
    await assert_clean(pair)
