"""The gateway's tokenizer / router requests around hung replicas (control.py), on a real nats-server
with stand-in replicas of the tokenizer's encode: one answers, one receives and never answers (a
stopped process keeps its subscriptions), one answers late. tests/faults/test_mesh_hung_replicas.py
runs the same with SIGSTOPped tokenizer and router processes."""

from __future__ import annotations

import asyncio

import pytest

from kvmesh.libs.bus import Bus, NoResponders
from kvmesh.schemas.messages import EncodeReply, EncodeRequest, EncodeResult, ErrorReply, Subjects
from kvmesh.services.gateway.control import ControlClient, ControlTimeout, tokenizer_try_timeout
from kvmesh.services.gateway.dispatch import Dispatcher
from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.params import Timeouts

SUBJECT = Subjects.TOKENIZER_ENCODE
REQUEST = EncodeRequest(request_id="r", prompt="hello")
ANSWER = EncodeReply(token_ids=[1, 2], block_hashes=[], block_size=16)


class Replica:
    """`mode`: "ok" answers, "hung" never does, "late" answers after `delay` (ErrorReply if
    `error`). It serves the queue subject and the every-replica one, unless told otherwise
    (`every_replica=False`: an older replica)."""

    def __init__(
        self,
        mode: str,
        delay: float = 0.0,
        error: bool = False,
        queue: bool = True,
        every_replica: bool = True,
    ):
        self.mode, self.delay, self.error = mode, delay, error
        self.queue, self.every_replica = queue, every_replica
        self.received = 0
        self.released = asyncio.Event()  # lets a hung handler return at teardown (close() drains)

    async def attach(self, url: str) -> Replica:
        self.bus = await Bus.connect(url, f"replica-{self.mode}")
        if self.queue:
            await self.bus.serve(SUBJECT, EncodeRequest, self.on_encode, queue="tokenizer")
        if self.every_replica:
            await self.bus.serve(Subjects.every_replica(SUBJECT), EncodeRequest, self.on_encode)
        return self

    async def on_encode(self, _req: EncodeRequest, _raw):
        self.received += 1
        if self.mode == "hung":
            await self.released.wait()
            return None
        await asyncio.sleep(self.delay)
        return ErrorReply(code="no_workers", message="stale") if self.error else ANSWER

    async def close(self) -> None:
        self.released.set()
        await self.bus.close()


@pytest.fixture
async def gateway_bus(gateway_nats_url):
    bus = await Bus.connect(gateway_nats_url, "gateway")
    yield bus
    await bus.close()


@pytest.fixture
async def replicas(gateway_nats_url):
    started: list[Replica] = []

    async def start(*reps: Replica) -> list[Replica]:
        for r in reps:
            started.append(await r.attach(gateway_nats_url))
        return list(reps)

    yield start
    for r in started:
        await r.close()


async def test_a_hung_replica_costs_a_try_not_a_request(gateway_bus, replicas):
    hung, _ok = await replicas(Replica("hung"), Replica("ok"))
    control = ControlClient(gateway_bus, budget=5.0, tries=3)
    for _ in range(20):
        assert await control.request(SUBJECT, REQUEST, EncodeResult, try_timeout=0.1) == ANSWER
    assert hung.received, "the queue group handed the hung replica its share"


async def test_one_try_on_the_queue_alone_fails_at_random(gateway_bus, replicas):
    """What the gateway did before: the hung replica's share of the requests fails (with two
    replicas each request lands on it with probability 1/2: 40 in a row miss it 1 time in 10^12)."""
    await replicas(Replica("hung"), Replica("ok"))
    control = ControlClient(gateway_bus, budget=0.3, tries=1)
    outcomes = []
    for _ in range(40):
        try:
            outcomes.append(await control.request(SUBJECT, REQUEST, EncodeResult, try_timeout=0.1))
        except ControlTimeout:
            outcomes.append(None)
            break
    assert None in outcomes


async def test_an_error_answer_is_held_while_a_hedged_try_is_pending(gateway_bus, replicas):
    # The queue group's only member answers a stale error late; the every-replica try gets the answer.
    await replicas(
        Replica("late", delay=0.4, error=True, every_replica=False), Replica("ok", delay=0.6, queue=False)
    )
    control = ControlClient(gateway_bus, budget=5.0, tries=2)
    assert await control.request(SUBJECT, REQUEST, EncodeResult, try_timeout=0.1) == ANSWER
    # With no other try pending, an error answer is the answer.
    control = ControlClient(gateway_bus, budget=5.0, tries=1)
    reply = await control.request(SUBJECT, REQUEST, EncodeResult, try_timeout=0.1)
    assert isinstance(reply, ErrorReply) and reply.message == "stale"


async def test_replicas_without_the_every_replica_subject_get_the_queue_again(gateway_bus, replicas):
    # answers long after the 0.1 s try timeout, so the hedge reaches it first even on a loaded machine
    (late,) = await replicas(Replica("late", delay=1.0, every_replica=False))
    control = ControlClient(gateway_bus, budget=5.0, tries=3)
    assert await control.request(SUBJECT, REQUEST, EncodeResult, try_timeout=0.1) == ANSWER
    # The hedge found no responders on every_replica and went to the queue. The replica handles one
    # message at a time (nats-py), so it counts the hedge only once its late answer has gone out:
    # wait for that (bounded) instead of racing it.
    async with asyncio.timeout(10):
        while late.received < 2:
            await asyncio.sleep(0.01)


async def test_every_replica_hung_is_a_503_and_none_at_all_no_responders(gateway_bus, replicas):
    with pytest.raises(NoResponders):
        await ControlClient(gateway_bus, budget=1.0, tries=3).request(SUBJECT, REQUEST, EncodeResult, 0.1)
    (hung,) = await replicas(Replica("hung"))
    dispatcher = Dispatcher(gateway_bus, Timeouts(bus=0.5, control_tries=3))
    with pytest.raises(GatewayError) as info:
        await dispatcher.ask("tokenizer", SUBJECT, REQUEST, EncodeResult, try_timeout=0.1)
    assert (info.value.status, info.value.code) == (503, "service_timeout")
    assert info.value.retry_after and "did not answer" in info.value.message
    assert hung.received >= 2  # the first try and at least one hedge reached it


def test_tokenizer_try_timeout_grows_with_the_text():
    assert tokenizer_try_timeout(1.0) == 1.0
    assert tokenizer_try_timeout(1.0, chars=1 << 20) == pytest.approx(5.0)
    assert tokenizer_try_timeout(1.0, token_ids=1 << 18) == pytest.approx(5.0)
