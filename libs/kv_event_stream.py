"""The KV event stream on JetStream: the workers publish into it, every index reads it in order.

Workers publish `KVEventBatch`es on `kvmesh.kv.events.<worker>` into the stream `KVMESH_KV_EVENTS`
(kept an hour, so that an index started or emptied later can replay it), with the worker id and a
per-worker sequence number in headers. Readers: the kv-index's lease holder (writing Redis) and each
router with `--index local` (its own replica in memory); both read with a `StreamReader`.

JetStream push consumers do not survive a NATS server restart (nats-py's ordered consumer does not
come back on its own either): a reader subscribes again after every reconnect, from the last
stream sequence it applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamConfig, StreamInfo
from nats.js.errors import NotFoundError

from kvmesh.libs.bus import Bus
from kvmesh.libs.kv_contract import CONTRACT_HEADER, parse_contract_header
from kvmesh.schemas.messages import KVContract, Subjects

log = logging.getLogger(__name__)

STREAM = "KVMESH_KV_EVENTS"
SEQ_HEADER = "Kvmesh-Seq"  # a batch's per-worker sequence number
WORKER_HEADER = "Kvmesh-Worker"  # the publishing worker (else the subject's last token)


async def ensure_stream(bus: Bus, max_age_s: float = 3600.0) -> bool:
    """Create (or keep) the KV-event stream. False when the server has no JetStream."""
    try:
        js = bus.nc.jetstream()
        await js.add_stream(
            StreamConfig(name=STREAM, subjects=[f"{Subjects.KV_EVENTS}.>"], max_age=max_age_s)
        )
        return True
    except Exception as exc:
        log.warning("JetStream unavailable (%r): KV events go out on core NATS, without replay", exc)
        return False


async def stream_info(bus: Bus, create: bool = True) -> tuple[str, StreamInfo]:
    """(identity, info) of the stream; the identity (its creation time) changes when the stream is
    re-created, e.g. by a NATS server that lost its store. Created first if missing and `create`."""
    js = bus.nc.jetstream()
    try:
        info = await js.stream_info(STREAM)
    except NotFoundError:  # nobody published yet: create it, as the workers do
        if not create or not await ensure_stream(bus):
            raise
        info = await js.stream_info(STREAM)
    return (info.created.isoformat() if info.created else STREAM), info


def batch_origin(msg: Msg) -> tuple[str, int | None]:
    """(worker, per-worker sequence number) of a stream message; the number is None if unreadable."""
    headers: Mapping[str, str] = msg.headers or {}
    worker = headers.get(WORKER_HEADER) or msg.subject.rsplit(".", 1)[-1]
    try:
        return worker, int(headers.get(SEQ_HEADER, "0"))
    except ValueError:
        log.warning("dropped KV events of %s with a bad sequence header", worker)
        return worker, None


def batch_contract(msg: Msg) -> KVContract | None:
    """The publisher's KV contract (libs/kv_contract.py), None when its batches carry none."""
    return parse_contract_header((msg.headers or {}).get(CONTRACT_HEADER))


class ReconnectWatch:
    """A reader's view of its NATS connection: after a reconnect its push consumer is gone, and the
    workers' silence during the outage was its own, not theirs."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._seen = bus.nc.stats["reconnects"]

    def reconnected(self) -> bool:
        """True once for each reconnect (or several) since the last call."""
        now = self.bus.nc.stats["reconnects"]
        if now == self._seen:
            return False
        self._seen = now
        return True

    @property
    def steady(self) -> bool:
        """Connected, with no reconnect since the last `reconnected()`: silence heard now is real."""
        return self.bus.nc.is_connected and self.bus.nc.stats["reconnects"] == self._seen


class StreamReader:
    """One ordered push consumer at a time on the stream, from a chosen sequence on. Messages reach
    `handle` one at a time, in stream order, under `lock`; once the subscription is stopped or
    `drop()` is called, its late messages are ignored."""

    def __init__(self, handle: Callable[[Msg], Awaitable[None]]) -> None:
        self._handle = handle
        self.lock = asyncio.Lock()  # held while a message is handled
        self._sub = None
        self._term = 0  # bumped whenever consumption stops: messages of an older term are ignored

    @property
    def active(self) -> bool:
        return self._sub is not None

    async def start(self, bus: Bus, after_seq: int) -> None:
        """(Re)subscribe: the next message handled is the first one after stream sequence `after_seq`."""
        await self.stop()
        if after_seq:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1
            )
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        self._term += 1
        self._sub = await bus.nc.jetstream().subscribe(
            f"{Subjects.KV_EVENTS}.>",
            stream=STREAM,
            cb=functools.partial(self._deliver, self._term),
            ordered_consumer=True,
            config=config,
        )

    def drop(self) -> None:
        """Ignore every message still to come (from inside `handle` too) until the next `start`."""
        self._term += 1

    async def stop(self) -> None:
        async with self.lock:  # not in the middle of a message
            self._term += 1
            sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), 2)

    async def _deliver(self, term: int, msg: Msg) -> None:
        async with self.lock:
            if term == self._term:
                await self._handle(msg)


async def every(
    tick_s: float,
    step: Callable[[], Awaitable[None]],
    what: str,
    on_failure: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run `step` every `tick_s` until cancelled; a failure is logged once (until a step succeeds
    again) and followed by `on_failure()`: a reader that stops at a fault retries by itself."""
    failing = False
    while True:
        await asyncio.sleep(tick_s)
        try:
            await step()
        except Exception as exc:
            if not failing:
                log.warning("%s: %r: retrying every %.2f s", what, exc, tick_s)
            failing = True
            if on_failure is not None:
                await on_failure()
        else:
            if failing:
                log.info("%s: answers again", what)
            failing = False
