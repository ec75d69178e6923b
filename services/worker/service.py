"""Worker service: the engine behind NATS. Accepts generate requests addressed to it, streams token
ids on each request's own subject, answers stats, aborts on demand, and beats its load."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from kvmesh.libs.bus import Bus
from kvmesh.libs.engine.async_engine import AsyncLLM
from kvmesh.libs.engine.engine import EngineStats
from kvmesh.libs.engine.sampling_params import InvalidRequestError, SamplingParams
from kvmesh.libs.kv_contract import DEFAULT_BLOCK_SIZE
from kvmesh.libs.kv_transfer.agent import KVTransferAgent
from kvmesh.libs.metrics import WORKER_STATS
from kvmesh.schemas.messages import (
    AbortRequest,
    ErrorReply,
    Finished,
    GenerateAccepted,
    GenerateRequest,
    Heartbeat,
    RequestStatusQuery,
    RequestStatusReply,
    StatsRequest,
    Subjects,
    WorkerStats,
)
from kvmesh.services.worker.disagg import DisaggConfig, PrefillServer, RemotePrefill
from kvmesh.services.worker.telemetry import RequestTelemetry, WorkerTelemetry
from kvmesh.services.worker.wire import chunk, compile_grammar, grammar_is_cold, rank_of, refusal, to_params

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    nats_url: str
    worker_id: str
    model: str
    role: str = "aggregated"
    heartbeat_interval_s: float = 1.0
    max_waiting: int = 64  # accepted requests not running yet; beyond, generate answers "overloaded"


class WorkerService:
    def __init__(
        self,
        config: WorkerConfig,
        llm: AsyncLLM,
        agent: KVTransferAgent | None = None,
        disagg: DisaggConfig | None = None,
    ) -> None:
        self.config = config
        self.llm = llm
        self.bus: Bus | None = None
        self._pumps: dict[str, asyncio.Task] = {}
        self._generate_sub = None
        # disaggregation: a NIXL agent over the KV cache; prefill role serves, others pull
        self.agent = agent
        self.disagg = disagg or DisaggConfig()
        self.prefill_server: PrefillServer | None = None
        self.remote: RemotePrefill | None = None
        self._remote_phase: set[str] = set()  # requests still getting their prompt blocks remotely
        self._compiling: set[str] = set()  # accepted guided requests whose grammar is being compiled
        self._stop = asyncio.Event()
        # Set by drain() once the generate subscription is gone: from then on new requests find no
        # responder here (after this connection's next round trip to the server).
        self.refusing_new = asyncio.Event()
        engine = llm.engine
        # how its block hashes are made: published in every heartbeat (libs/kv_contract.py)
        self.kv_contract = engine.kv_contract if engine is not None else None
        block_size = engine.config.block_size if engine is not None else DEFAULT_BLOCK_SIZE
        self._max_running = engine.config.max_num_seqs if engine is not None else 0
        self.telemetry = WorkerTelemetry(config.model, config.worker_id, block_size)

    def stats(self) -> WorkerStats:
        s: EngineStats = self.llm.stats
        return WorkerStats(
            worker_id=self.config.worker_id,
            role=self.config.role,
            model=self.config.model,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_blocks=s.num_blocks,
            num_free_blocks=s.num_free_blocks,
            kv_usage=s.kv_usage,
            outstanding_tokens=s.outstanding_tokens,
            max_running=self._max_running,
            max_waiting=self.config.max_waiting,
            num_preemptions=s.num_preemptions,
            prefix_hit_tokens=s.prefix_hit_tokens,
            prefix_query_tokens=s.prefix_query_tokens,
            num_leased_blocks=s.num_leased_blocks,
            remote_prefills=self.remote.num_remote if self.remote else 0,
            local_prefill_fallbacks=self.remote.num_fallbacks if self.remote else 0,
            kv_blocks_pulled=self.agent.blocks_pulled if self.agent else 0,
            kv_bytes_pulled=self.agent.bytes_pulled if self.agent else 0,
            kv_contract=self.kv_contract,
        )

    async def generate(self, req: GenerateRequest) -> GenerateAccepted | ErrorReply:
        if req.request_id in self._pumps:
            return ErrorReply(code="invalid_request", message=f"duplicate request id {req.request_id}")
        if self.num_waiting() >= self.config.max_waiting > 0 and not req.migrated:
            # a bounded queue: the gateway tries another worker, or tells its client to retry later
            return ErrorReply(code="overloaded", message=f"{self.num_waiting()} requests already waiting")
        telemetry = self.telemetry.start(req)
        if req.prefill_worker_id and self.remote is not None:
            return await self._generate_disaggregated(req, telemetry)
        try:
            params = to_params(req)
            if grammar_is_cold(self.llm, params):
                return await self._generate_cold_grammar(req, params, telemetry)
            await compile_grammar(self.llm, params)
            stream = await self.llm.add_request(
                req.request_id, req.token_ids, params, cache_salt=req.cache_salt, rank=rank_of(req)
            )
        except BaseException as exc:
            telemetry.fail(exc)
            if not isinstance(exc, InvalidRequestError):
                raise
            code = (
                "prompt_too_long" if "context" in str(exc) or "do not fit" in str(exc) else "invalid_request"
            )
            return ErrorReply(code=code, message=str(exc), field=exc.field)
        self._pumps[req.request_id] = asyncio.create_task(self._pump(req, stream, telemetry))
        return GenerateAccepted(worker_id=self.config.worker_id)

    async def _generate_cold_grammar(
        self, req: GenerateRequest, params: SamplingParams, telemetry: RequestTelemetry
    ) -> GenerateAccepted:
        """The first guided request here: loading the compiler (xgrammar, the vocabulary) takes seconds,
        longer than the gateway waits for acceptance, and would cost every worker that never sees a
        grammar if done at start. So accept once the request is otherwise valid, then compile and queue
        it; a grammar that does not compile ends its stream with the refusal (a 400 unless streaming)."""
        await self.llm.call(lambda e: e.validate(req.token_ids, params))
        self._compiling.add(req.request_id)
        self._pumps[req.request_id] = asyncio.create_task(self._compile_then_pump(req, params, telemetry))
        return GenerateAccepted(worker_id=self.config.worker_id)

    async def _compile_then_pump(
        self, req: GenerateRequest, params: SamplingParams, telemetry: RequestTelemetry
    ) -> None:
        assert self.bus is not None
        rid = req.request_id
        try:
            await compile_grammar(self.llm, params)
            stream = await self.llm.add_request(
                rid, req.token_ids, params, cache_salt=req.cache_salt, rank=rank_of(req)
            )
        except Exception as exc:
            telemetry.fail(exc)
            refused = refusal(exc) if isinstance(exc, InvalidRequestError) else None
            with contextlib.suppress(Exception):
                reply = refused or ErrorReply(code="internal", message=str(exc))
                await self.bus.publish(req.stream_subject, reply)
            self._pumps.pop(rid, None)
            return
        except asyncio.CancelledError:  # aborted while compiling
            self._pumps.pop(rid, None)
            raise
        finally:
            self._compiling.discard(rid)
        await self._pump(req, stream, telemetry)

    async def _generate_disaggregated(
        self, req: GenerateRequest, telemetry: RequestTelemetry
    ) -> GenerateAccepted | ErrorReply:
        """Accept at once (after validation), then get the prompt's blocks from the prefill worker
        and pull them while this worker keeps decoding its other requests."""
        try:
            params = to_params(req)
            if not grammar_is_cold(self.llm, params):  # cold: compiled after acceptance (see below)
                await compile_grammar(self.llm, params)
            await self.llm.call(lambda e: e.validate(req.token_ids, params))
        except InvalidRequestError as exc:
            telemetry.fail(exc)
            return refusal(exc)
        self._remote_phase.add(req.request_id)
        self._pumps[req.request_id] = asyncio.create_task(self._remote_then_pump(req, params, telemetry))
        return GenerateAccepted(worker_id=self.config.worker_id)

    async def _remote_then_pump(
        self, req: GenerateRequest, params: SamplingParams, telemetry: RequestTelemetry
    ) -> None:
        assert self.bus is not None and self.remote is not None and req.prefill_worker_id
        rid = req.request_id
        try:
            await compile_grammar(self.llm, params)  # cached by now unless the compiler was cold
            commit = await self.remote.prepare(
                rid, req.token_ids, req.prefill_worker_id, telemetry, req.cache_salt
            )
            try:
                stream = await self.llm.add_request(
                    rid, req.token_ids, params, before=commit, cache_salt=req.cache_salt, rank=rank_of(req)
                )
            except Exception:
                if commit is None:
                    raise
                log.exception("committing pulled blocks of %s failed: prefilling locally", rid)
                await self.llm.call(lambda e: e.transfers.cancel(f"pull-{rid}"))
                stream = await self.llm.add_request(
                    rid, req.token_ids, params, cache_salt=req.cache_salt, rank=rank_of(req)
                )
        except Exception as exc:
            telemetry.fail(exc)
            if isinstance(exc, InvalidRequestError):  # a grammar that does not compile: the client's
                reply = refusal(exc)
            else:
                log.exception("request %s failed before its first step", rid)
                reply = ErrorReply(code="internal", message=str(exc))
            with contextlib.suppress(Exception):
                await self.bus.publish(req.stream_subject, reply)
            self._pumps.pop(rid, None)
            return
        except asyncio.CancelledError:  # aborted while its blocks were on the way
            self._pumps.pop(rid, None)
            raise
        finally:
            self._remote_phase.discard(rid)
        await self._pump(req, stream, telemetry)

    def abort(self, request_id: str) -> None:
        if request_id in self._remote_phase or request_id in self._compiling:
            task = self._pumps.get(request_id)
            if task is not None:
                task.cancel()
        self.llm.abort(request_id)

    async def _pump(self, req: GenerateRequest, stream: asyncio.Queue, telemetry: RequestTelemetry) -> None:
        """Forward the engine's outputs for one request to its stream subject (no trace headers on
        the per-token path: the request's span lives here, not in the messages)."""
        assert self.bus is not None
        subject = req.stream_subject
        try:
            while True:
                out = await stream.get()
                if isinstance(out, BaseException):
                    telemetry.fail(out)
                    await self.bus.publish(
                        subject, ErrorReply(code="internal", message=str(out)), traced=False
                    )
                    return
                telemetry.output(out)
                if out.new_token_ids:
                    await self.bus.publish(subject, chunk(out), traced=False)
                if out.finished:
                    await self.bus.publish(
                        subject,
                        Finished(
                            finish_reason=out.finish_reason or "abort",
                            num_prompt_tokens=out.num_prompt_tokens,
                            num_output_tokens=out.num_output_tokens,
                            num_cached_tokens=out.num_cached_tokens,
                        ),
                        traced=False,
                    )
                    return
        except Exception as exc:
            log.exception("stream of %s failed; aborting it", req.request_id)
            telemetry.fail(exc)
            self.llm.abort(req.request_id)
        finally:
            self._pumps.pop(req.request_id, None)

    async def heartbeat_loop(self, stop: asyncio.Event) -> None:
        assert self.bus is not None
        interval = self.config.heartbeat_interval_s
        while not stop.is_set():
            try:
                await self.bus.publish(
                    Subjects.WORKER_HEARTBEAT,
                    Heartbeat(stats=self.stats(), ts=time.time(), interval_s=interval),
                )
            except Exception as exc:  # NATS reconnecting: the next beat will go out
                log.debug("heartbeat failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def attach(self, bus: Bus) -> None:
        self.bus = bus
        self.llm.start()
        wid = self.config.worker_id
        WORKER_STATS.add(wid, self.stats)  # vLLM's state gauges, read at scrape time

        async def on_generate(req: GenerateRequest, _raw) -> GenerateAccepted | ErrorReply:
            return await self.generate(req)

        async def on_abort(req: AbortRequest, _raw) -> None:
            self.abort(req.request_id)

        async def on_stats(req: StatsRequest, _raw) -> WorkerStats:
            stats = self.stats()
            if req.check_integrity:
                stats.integrity_error = await self.integrity_error()
            return stats

        async def on_status(req: RequestStatusQuery, _raw) -> RequestStatusReply:
            return RequestStatusReply(running=req.request_id in self._pumps)

        self._generate_sub = await bus.serve(Subjects.worker(wid, "generate"), GenerateRequest, on_generate)
        await bus.serve(Subjects.worker(wid, "abort"), AbortRequest, on_abort)
        await bus.serve(Subjects.worker(wid, "stats"), StatsRequest, on_stats)
        await bus.serve(Subjects.worker(wid, "status"), RequestStatusQuery, on_status)
        if self.agent is not None:
            if self.config.role == "prefill":
                self.prefill_server = PrefillServer(wid, self.llm, self.agent, self.disagg, self.telemetry)
                await self.prefill_server.attach(bus)
                self._background = asyncio.create_task(self.prefill_server.run(self._stop))
            else:
                self.remote = RemotePrefill(self.llm, self.agent, bus, self.disagg)

    async def integrity_error(self) -> str | None:
        """The engine's invariant check, run between two steps: None when every block adds up."""
        try:
            await self.llm.call(lambda e: e.check_integrity())
        except AssertionError as exc:
            return str(exc) or "integrity check failed"
        return None

    def num_waiting(self) -> int:
        """Accepted requests not running yet. The engine's stats lag a step behind, so count the
        streams (one per accepted request) beyond those it last reported running."""
        s = self.llm.stats
        return max(len(self._pumps) - s.num_running, s.num_waiting) if s is not None else len(self._pumps)

    async def drain(self, timeout_s: float) -> int:
        """Graceful stop: take no new requests (the gateway retries them elsewhere), let the running
        ones finish for up to `timeout_s`, abort the rest. Returns how many had to be aborted."""
        if self._generate_sub is not None:
            await self._generate_sub.unsubscribe()
            self._generate_sub = None
        self.refusing_new.set()
        pumps = list(self._pumps.values())
        if pumps:
            _, pending = await asyncio.wait(pumps, timeout=timeout_s)
            for rid in list(self._pumps):
                self.abort(rid)
            if pending:
                await asyncio.wait(pending, timeout=5)
        self._stop.set()  # the prefill server's lease loop
        return len(pending) if pumps else 0
