"""The two ways prefix_bench.py sends a trace request, both timed from its scheduled arrival.

- `NatsClient` does what the gateway does, minus HTTP: route (kvmesh.router.route, with the
  prompt's block hashes and session), subscribe to the request's stream, ask the chosen worker to
  generate (another worker if it answers `overloaded`), read token chunks to `Finished`. Used with
  simulated workers: at hundreds of requests per second the gateway's HTTP/SSE work on 2 cores
  would be the bottleneck, and it adds the same to every routing policy.
- `HttpClient` goes through the real mesh's gateway: streamed /v1/completions with the prompt's
  token ids, `user` as the session, the cached-token count from the usage chunk.
TTFT is measured to the first token chunk; a request still without one when the run is cut off
keeps `ttft_s=None` and is reported as censored (its wait so far is a lower bound).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from kvmesh.libs.bus import Bus, BusError, decode
from kvmesh.loadtest.prefix_workload import TraceRequest
from kvmesh.schemas.messages import (
    AbortRequest,
    ErrorReply,
    Finished,
    GenerateAccepted,
    GenerateRequest,
    GenerateResult,
    RouteReply,
    RouteRequest,
    RouteResult,
    SamplingOptions,
    StreamMessage,
    Subjects,
    TokenChunk,
)


@dataclass(slots=True)
class Record:
    index: int
    step: int
    arrival_s: float  # scheduled, since the run's start
    prompt_tokens: int
    ideal_cached_tokens: int
    worker_id: str | None = None
    route_s: float | None = None  # round trip of the routing request
    ttft_s: float | None = None
    e2e_s: float | None = None
    finish_s: float | None = None  # since the run's start
    output_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


class NatsClient:
    def __init__(self, bus: Bus, run_id: str, output_tokens: int, t0: float) -> None:
        self.bus = bus
        self.run_id = run_id
        self.output_tokens = output_tokens
        self.t0 = t0
        self.running: dict[str, str] = {}  # request id -> worker (for aborts at the cut-off)

    async def send(self, req: TraceRequest, rec: Record) -> None:
        rid = f"{self.run_id}-{req.index}"
        start = self.t0 + req.arrival_s
        exclude: list[str] = []
        sub, queue = await self.bus.subscribe_queue(Subjects.stream(rid))
        try:
            for _ in range(4):
                route = RouteRequest(
                    request_id=rid,
                    num_tokens=len(req.token_ids),
                    max_tokens=self.output_tokens,
                    block_hashes=req.block_hashes,
                    session_id=req.session_id,
                    exclude=exclude,
                )
                t = time.perf_counter()
                reply = await self.bus.request(Subjects.ROUTER_ROUTE, route, RouteResult, timeout=10)
                rec.route_s = time.perf_counter() - t
                if not isinstance(reply, RouteReply):
                    rec.error = f"route: {reply.code}: {reply.message}"
                    return
                gen = GenerateRequest(
                    request_id=rid,
                    token_ids=req.token_ids,
                    sampling=SamplingOptions(max_tokens=self.output_tokens, temperature=0, ignore_eos=True),
                    stream_subject=Subjects.stream(rid),
                )
                accepted = await self.bus.request(
                    Subjects.worker(reply.worker_id, "generate"), gen, GenerateResult, timeout=10
                )
                if isinstance(accepted, GenerateAccepted):
                    rec.worker_id = reply.worker_id
                    break
                if accepted.code != "overloaded":
                    rec.error = f"generate: {accepted.code}: {accepted.message}"
                    return
                exclude.append(reply.worker_id)
            else:
                rec.error = "every worker tried was overloaded"
                return
            self.running[rid] = rec.worker_id
            while True:
                msg = decode((await queue.get()).data, StreamMessage)
                now = time.perf_counter()
                if isinstance(msg, TokenChunk):
                    if rec.ttft_s is None:
                        rec.ttft_s = now - start
                    rec.output_tokens += len(msg.token_ids)
                elif isinstance(msg, Finished):
                    rec.cached_tokens = msg.num_cached_tokens
                    rec.e2e_s, rec.finish_s = now - start, now - self.t0
                    return
                else:
                    assert isinstance(msg, ErrorReply)
                    rec.error = f"stream: {msg.code}: {msg.message}"
                    return
        except BusError as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.running.pop(rid, None)
            await sub.unsubscribe()

    async def abort_all(self) -> None:
        for rid, worker in list(self.running.items()):
            await self.bus.publish(Subjects.worker(worker, "abort"), AbortRequest(request_id=rid))


class HttpClient:
    def __init__(self, base_url: str, model: str, output_tokens: int, t0: float) -> None:
        import httpx

        self.url = f"{base_url}/v1/completions"
        self.model = model
        self.output_tokens = output_tokens
        self.t0 = t0
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0), limits=limits)
        self.cut = False  # the run was cut off: a broken stream now is the cut, not a failure

    async def send(self, req: TraceRequest, rec: Record) -> None:
        start = self.t0 + req.arrival_s
        body = {
            "model": self.model,
            "prompt": req.token_ids,
            "max_tokens": self.output_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": req.session_id,
        }
        try:
            async with self.client.stream("POST", self.url, json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    rec.error = f"HTTP {response.status_code}: {text[:200]}"
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    event = json.loads(line[5:])
                    now = time.perf_counter()
                    if event.get("error"):
                        rec.error = f"stream: {str(event['error'])[:200]}"
                        return
                    if event.get("choices") and rec.ttft_s is None:
                        rec.ttft_s = now - start
                    if usage := event.get("usage"):
                        rec.output_tokens = usage.get("completion_tokens") or 0
                        rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get(
                            "cached_tokens"
                        ) or 0
                rec.e2e_s = time.perf_counter() - start
                rec.finish_s = time.perf_counter() - self.t0
        except Exception as exc:  # one failed request, never a failed run
            if not self.cut:
                rec.error = f"{type(exc).__name__}: {exc}"[:200]

    async def abort_all(self) -> None:
        """Closing the connections cancels what is in flight (the gateway aborts on disconnect)."""
        self.cut = True
        await self.client.aclose()


async def run_trace(client, trace: list[TraceRequest], t0: float, cutoff_s: float, progress) -> list[Record]:
    """Send every request at its arrival time; at `cutoff_s` after t0 stop waiting and abort the rest."""
    records = [Record(r.index, r.step, r.arrival_s, len(r.token_ids), r.ideal_cached_tokens) for r in trace]
    tasks: list[asyncio.Task] = []
    progress_task = asyncio.create_task(progress(records))
    for req, rec in zip(trace, records, strict=True):
        delay = t0 + req.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(client.send(req, rec)))
    remaining = t0 + cutoff_s - time.perf_counter()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, remaining))
        if pending:
            await client.abort_all()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    progress_task.cancel()
    return records
