"""Prefill/decode disaggregation inside a worker: both sides of a remote prefill.

Prefill side (`PrefillServer`): computes the KV of a prompt's whole blocks, keeps those blocks
pinned under a lease, answers with their block ids; the decode side releases them after its pull,
or the lease expires and frees them (a decode worker that died never strands blocks).

Decode side (`RemotePrefill`): asks a prefill worker for the prompt's blocks, skips the ones its
own prefix cache already holds, reserves local blocks, pulls the rest with one NIXL READ (one
descriptor per block), releases the lease, and hands the request to its engine with the pulled
blocks committed to the prefix cache, so only the last partial block is computed locally.
Whatever fails (prefill worker gone, timeout, transfer error after one retry), the request falls
back to a local prefill: the client never sees the difference except in latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmesh.libs.bus import Bus, BusError
from kvmesh.libs.engine.async_engine import AsyncLLM
from kvmesh.libs.engine.block_hash import hash_blocks, salted_extra_keys
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.libs.engine.sampling_params import InvalidRequestError, SamplingParams
from kvmesh.libs.kv_transfer.agent import KVTransferAgent, TransferError
from kvmesh.libs.tracing import kv_transfer_span
from kvmesh.schemas.messages import ErrorReply, StatsRequest, Subjects, WorkerStats
from kvmesh.schemas.transfer import (
    NixlInfo,
    NixlInfoRequest,
    NixlInfoResult,
    PrefillReply,
    PrefillRequest,
    PrefillResult,
    ReleaseBlocks,
)
from kvmesh.services.worker.telemetry import WorkerTelemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DisaggConfig:
    lease_s: float = 30.0  # prefill side: pinned blocks are freed this long after the reply
    prefill_timeout_s: float = 120.0  # decode side: give up on a remote prefill after this long
    liveness_interval_s: float = 1.0  # decode side: ping the prefill worker this often meanwhile
    transfer_timeout_s: float = 10.0
    min_remote_blocks: int = 1  # decode side: pull only when at least this many blocks are missing


# -- prefill side ------------------------------------------------------------------------------------


class PrefillServer:
    def __init__(
        self,
        worker_id: str,
        llm: AsyncLLM,
        agent: KVTransferAgent,
        config: DisaggConfig,
        telemetry: WorkerTelemetry | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.telemetry = telemetry
        self.llm = llm
        self.agent = agent
        self.config = config
        self.leases: dict[str, float] = {}  # engine request id -> monotonic deadline
        self.bus: Bus | None = None
        self.num_expired = 0

    async def attach(self, bus: Bus) -> None:
        self.bus = bus
        wid = self.worker_id

        async def on_prefill(req: PrefillRequest, _raw) -> PrefillReply | ErrorReply:
            return await self.prefill(req)

        async def on_release(msg: ReleaseBlocks, _raw) -> None:
            await self.release(_lease_id(msg.request_id))

        async def on_info(_req: NixlInfoRequest, _raw) -> NixlInfo:
            return self.agent.info()

        await bus.serve(Subjects.worker(wid, "prefill"), PrefillRequest, on_prefill)
        await bus.serve(Subjects.worker(wid, "release"), ReleaseBlocks, on_release)
        await bus.serve(Subjects.worker(wid, "nixl"), NixlInfoRequest, on_info)

    async def prefill(self, req: PrefillRequest) -> PrefillReply | ErrorReply:
        t0 = time.monotonic()
        lease_id = _lease_id(req.request_id)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        telemetry = self.telemetry.start_prefill(req) if self.telemetry is not None else None
        try:
            stream = await self.llm.add_request(
                lease_id, req.token_ids, params, hold_blocks=True, cache_salt=req.cache_salt
            )
        except InvalidRequestError as exc:
            if telemetry is not None:
                telemetry.fail(exc)
            return ErrorReply(code="invalid_request", message=str(exc), field=exc.field)
        try:
            while True:
                out = await stream.get()
                if isinstance(out, BaseException):
                    if telemetry is not None:
                        telemetry.fail(out)
                    return ErrorReply(code="internal", message=str(out))
                if telemetry is not None:
                    telemetry.output(out)
                if out.finished:
                    break
        except asyncio.CancelledError:
            self.llm.abort(lease_id)
            if telemetry is not None:
                telemetry.fail("cancelled")
            raise
        if out.held_block_ids is None:  # aborted before it finished
            return ErrorReply(code="unavailable", message=f"prefill of {req.request_id} was aborted")
        self.leases[lease_id] = time.monotonic() + self.config.lease_s
        return PrefillReply(
            request_id=req.request_id,
            agent_name=self.agent.agent_name,
            block_ids=out.held_block_ids,
            lease_s=self.config.lease_s,
            num_cached_tokens=out.num_cached_tokens,
            prefill_s=time.monotonic() - t0,
        )

    async def release(self, lease_id: str) -> None:
        """Free a lease's blocks; a release that arrives while the prefill still runs stops it."""
        if self.leases.pop(lease_id, None) is not None:
            await self.llm.call(lambda e: e.release_held(lease_id))
        else:
            self.llm.abort(lease_id)  # no-op unless that prefill is still queued or running

    async def run(self, stop: asyncio.Event) -> None:
        """Expire leases, and keep the NIXL agent progressing while peers may be reading."""
        next_expiry = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_expiry:
                next_expiry = now + 0.25
                for lease_id in [lid for lid, d in self.leases.items() if d <= now]:
                    log.warning("lease %s expired unreleased: freeing its blocks", lease_id)
                    self.num_expired += 1
                    await self.release(lease_id)
            if self.leases:
                try:
                    await self.agent.poll_notifs()
                except Exception as exc:
                    log.debug("NIXL notif poll: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.002 if self.leases else 0.05)


def _lease_id(request_id: str) -> str:
    return f"prefill-{request_id}"


# -- decode side -------------------------------------------------------------------------------------


class RemotePrefill:
    def __init__(self, llm: AsyncLLM, agent: KVTransferAgent, bus: Bus, config: DisaggConfig) -> None:
        self.llm = llm
        self.agent = agent
        self.bus = bus
        self.config = config
        self.peer_agents: dict[str, str] = {}  # prefill worker id -> its NIXL agent name
        self.num_remote = 0  # requests whose blocks were pulled
        self.num_fallbacks = 0  # remote prefills that failed over to a local prefill

    async def prepare(
        self,
        request_id: str,
        token_ids: list[int],
        prefill_worker: str,
        telemetry=None,
        cache_salt: str | None = None,
    ) -> Callable[[LLMEngine], None] | None:
        """Get the prompt's blocks into this engine's prefix cache from `prefill_worker`. Returns
        the commit to run in the engine thread right before the request is added, or None when the
        request should simply be prefilled here (nothing worth pulling, or a failure).
        `telemetry` (the request's RequestTelemetry) gets the transfer's span and metrics; both
        sides hash the blocks with the request's `cache_salt`."""
        block_size = self.agent.layout.block_size
        num_blocks = (len(token_ids) - 1) // block_size  # the last token is always computed here
        if num_blocks == 0:
            return None
        prefix = token_ids[: num_blocks * block_size]
        local = await self.llm.call(lambda e: e.num_cached_prefix_blocks(prefix, cache_salt))
        if num_blocks - local < self.config.min_remote_blocks:
            return None
        transfer_id = f"pull-{request_id}"
        plan = None
        try:
            with telemetry.active() if telemetry is not None else contextlib.nullcontext():
                reply = await self._remote_prefill(request_id, prefix, prefill_worker, cache_salt)
            plan = await self._pull(reply, prefill_worker, transfer_id, prefix, local, telemetry, cache_salt)
        except (BusError, TransferError, TimeoutError) as exc:
            log.warning("remote prefill of %s on %s failed (%s)", request_id, prefill_worker, exc)
        finally:  # released or never needed: the prefill side frees (or stops computing) its blocks
            with contextlib.suppress(BusError):
                await self.bus.publish(
                    Subjects.worker(prefill_worker, "release"), ReleaseBlocks(request_id=request_id)
                )
        if plan is None:
            log.warning("prefilling %s locally", request_id)
            self.num_fallbacks += 1
        else:
            self.num_remote += 1
            if telemetry is not None:
                telemetry.prefill_where = "remote"
        return plan

    async def _pull(
        self,
        reply: PrefillReply,
        prefill_worker: str,
        transfer_id: str,
        prefix: list[int],
        local: int,
        telemetry=None,
        cache_salt: str | None = None,
    ) -> Callable[[LLMEngine], None] | None:
        num_blocks = len(reply.block_ids)
        remote_ids = reply.block_ids[local:]
        local_ids = await self.llm.call(lambda e: e.transfers.reserve(transfer_id, len(remote_ids)))
        if local_ids is None:
            log.warning("no free blocks to pull %d blocks into", len(remote_ids))
            return None
        try:
            for attempt in (1, 2):
                try:
                    await self._ensure_peer(prefill_worker, reply.agent_name)
                    nbytes = len(remote_ids) * self.agent.layout.block_bytes
                    with _transfer_scope(telemetry, prefill_worker, len(remote_ids), nbytes):
                        await self.agent.pull(
                            reply.agent_name, remote_ids, local_ids, self.config.transfer_timeout_s
                        )
                    break
                except (BusError, TransferError, TimeoutError) as exc:
                    log.warning("pull from %s failed (attempt %d): %s", prefill_worker, attempt, exc)
                    await self.agent.forget_peer(reply.agent_name)
                    self.peer_agents.pop(prefill_worker, None)
            else:
                await self.llm.call(lambda e: e.transfers.cancel(transfer_id))
                return None
        except BaseException:  # cancelled (the client left): the reserved blocks go back
            await asyncio.shield(self.llm.call(lambda e: e.transfers.cancel(transfer_id)))
            raise
        block_size = self.agent.layout.block_size

        def commit(engine: LLMEngine) -> None:
            first = salted_extra_keys(engine.extra_keys, cache_salt)
            hashes = hash_blocks(prefix, block_size, engine.extra_keys, engine.hash_seed, None, first)
            assert len(hashes) == num_blocks
            salted = local == 0 and cache_salt  # the event says the first block's salt (the index's key)
            engine.transfers.commit(
                transfer_id,
                hashes[local:],
                parent=hashes[local - 1] if local else None,
                token_ids=prefix[local * block_size :],
                extra_keys=[(cache_salt,), *[None] * (num_blocks - 1)] if salted else None,
            )

        return commit

    async def _remote_prefill(
        self, request_id: str, prefix: list[int], prefill_worker: str, cache_salt: str | None = None
    ) -> PrefillReply:
        """The prefill request, watched: a prefill worker that stops answering pings is given up on
        within a couple of ping intervals, not after the whole prefill timeout."""
        call = asyncio.ensure_future(
            self.bus.request(
                Subjects.worker(prefill_worker, "prefill"),
                PrefillRequest(request_id=request_id, token_ids=prefix, cache_salt=cache_salt),
                PrefillResult,
                timeout=self.config.prefill_timeout_s,
            )
        )
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=self.config.liveness_interval_s)
                if done:
                    break
                await self.bus.request(
                    Subjects.worker(prefill_worker, "stats"),
                    StatsRequest(),
                    WorkerStats,
                    timeout=self.config.liveness_interval_s,
                )
        finally:
            if not call.done():
                call.cancel()
        reply = call.result()
        if isinstance(reply, ErrorReply):
            raise TransferError(f"prefill worker refused: {reply.code}: {reply.message}")
        return reply

    async def _ensure_peer(self, prefill_worker: str, agent_name: str) -> None:
        known = self.peer_agents.get(prefill_worker)
        if known == agent_name and self.agent.knows(agent_name):
            return
        if known is not None and known != agent_name:  # the prefill worker restarted
            await self.agent.forget_peer(known)
        info = await self.bus.request(
            Subjects.worker(prefill_worker, "nixl"), NixlInfoRequest(), NixlInfoResult, timeout=5.0
        )
        if isinstance(info, ErrorReply):
            raise TransferError(f"no NIXL metadata from {prefill_worker}: {info.message}")
        if info.agent_name != agent_name:
            raise TransferError(f"{prefill_worker} restarted during the request")
        await self.agent.add_peer(info)
        self.peer_agents[prefill_worker] = agent_name


def _transfer_scope(
    telemetry, peer: str, num_blocks: int, num_bytes: int
) -> contextlib.AbstractContextManager:
    """The pull's span (a child of the request's) and its kvmesh:kv_transfer_* metrics."""
    stack = contextlib.ExitStack()
    if telemetry is None:
        return stack
    stack.enter_context(telemetry.active())
    stack.enter_context(kv_transfer_span(peer, num_blocks, num_bytes, telemetry.metrics))
    return stack
