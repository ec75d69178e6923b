"""The engine behind an asyncio API: add a request, stream its outputs, abort it.

The engine runs in a thread of its own (torch releases the GIL inside its ops, so the event loop
stays responsive for network I/O). The thread owns the engine exclusively: callers talk to it only
through a command queue, and it hands outputs back to the loop once per step.

Build the engine inside that thread (pass a factory, not an engine) when speed matters: libgomp
counts the OpenMP threads of every thread that ever ran a parallel region, and once that count
exceeds the cores it throttles its spin-waits to almost nothing. Loading the model on the main
thread and stepping it on another made every decode step ~2x slower on 2 cores.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.libs.engine.introspection import EngineStats
from kvmesh.libs.engine.outputs import RequestOutput
from kvmesh.libs.engine.sampling_params import SamplingParams
from kvmesh.schemas.kv_events import KVEvent

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (crashed or shut down); no request can complete."""


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    stream: asyncio.Queue
    accepted: asyncio.Future | None  # None: accepted already; a late refusal goes on the stream
    hold_blocks: bool = False
    before: Callable[[LLMEngine], object] | None = None  # runs in the engine thread first
    cache_salt: str | None = None
    rank: tuple[int, int] = (0, 0)


@dataclass(slots=True)
class _Call:
    fn: Callable[[LLMEngine], object]
    done: asyncio.Future


@dataclass(slots=True)
class _Abort:
    request_id: str


class StreamingLLM(ABC):
    """An engine behind an asyncio API, as WorkerService uses it: `add_request` hands back a queue
    its RequestOutputs (or an exception) arrive on, the last output with finished=True; `abort`
    cancels. Both the real engine (AsyncLLM) and the simulated one (sim_worker's SimLLM) are one."""

    @abstractmethod
    async def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> asyncio.Queue:
        """Queue a request (raise InvalidRequestError if the engine refuses it); return its queue."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Cancel a request (no-op if it already finished)."""

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the last one has finished=True. Raises InvalidRequestError
        (a ValueError) before the first output if the engine refuses the request. Closing the
        iterator early aborts the request."""
        stream = await self.add_request(request_id, prompt, params)
        finished = False
        try:
            while not finished:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)


class AsyncLLM(StreamingLLM):
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]) -> None:
        self._factory = None if isinstance(engine, LLMEngine) else engine
        self.engine: LLMEngine | None = engine if isinstance(engine, LLMEngine) else None
        self._built = threading.Event()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}  # touched only by the engine thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._events: deque[KVEvent] = deque()
        self._stopping = False
        self.error: BaseException | None = None
        self.stats: EngineStats | None = self.engine.stats() if self.engine is not None else None

    # -- public API --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="kvmesh-engine", daemon=True)
            self._thread.start()

    async def ready(self) -> LLMEngine:
        """Start the engine thread and wait until the engine is built (raises if building failed)."""
        self.start()
        await asyncio.get_running_loop().run_in_executor(None, self._built.wait)
        if self.engine is None:
            raise EngineDeadError("the engine failed to start") from self.error
        return self.engine

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        hold_blocks: bool = False,
        before: Callable[[LLMEngine], object] | None = None,
        cache_salt: str | None = None,
        rank: tuple[int, int] = (0, 0),
    ) -> asyncio.Queue:
        """Queue a request; returns the queue its RequestOutputs arrive on. `before` runs in the
        engine thread just ahead of it (e.g. committing pulled KV blocks, so no step runs between).
        `cache_salt`: its prefix cache is shared only with requests of the same salt. `rank`: the
        scheduler's order, lower first (scheduler.py).

        A plain request is accepted at once: validated here, in the caller's event loop (checks
        against the engine's fixed limits only), and queued without waiting for the engine thread's
        next step boundary, which under load can be a long prefill away. Should the engine still
        refuse it (a request id it already runs), the refusal arrives on the stream. A request with
        `before` or `hold_blocks` waits for the engine thread, whose answer its caller acts on."""
        self.start()
        if self.error is not None or self._stopping:
            raise EngineDeadError("the engine is not running") from self.error
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        if before is None and not hold_blocks and self.engine is not None:
            self.engine.validate(prompt, params)  # raises InvalidRequestError naming the field
            self._commands.put(_Add(request_id, prompt, params, stream, None, False, None, cache_salt, rank))
            return stream
        accepted = loop.create_future()
        self._commands.put(
            _Add(request_id, prompt, params, stream, accepted, hold_blocks, before, cache_salt, rank)
        )
        await accepted
        return stream

    async def call(self, fn: Callable[[LLMEngine], object]) -> object:
        """Run `fn(engine)` in the engine thread between two steps and return its result."""
        self.start()
        if self.error is not None or self._stopping:
            raise EngineDeadError("the engine is not running") from self.error
        done = asyncio.get_running_loop().create_future()
        self._commands.put(_Call(fn, done))
        return await done

    def abort(self, request_id: str) -> None:
        """Cancel a request (no-op if it already finished); its blocks are freed on the next step."""
        self._commands.put(_Abort(request_id))

    def take_kv_events(self) -> list[KVEvent]:
        events = []
        while self._events:
            events.append(self._events.popleft())
        return events

    def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.engine is None:
                self.engine = self._factory()
                self.stats = self.engine.stats()
        except BaseException as exc:
            log.exception("building the engine failed")
            self.error = exc
            return
        finally:
            self._built.set()
        try:
            while not self._stopping:
                self._drain_commands(block=not self.engine.has_unfinished_requests())
                if self._stopping:
                    break
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                self._events.extend(self.engine.take_kv_events())
                self.stats = self.engine.stats()
                if outputs:
                    self._deliver(outputs)
        except BaseException as exc:  # the engine is broken: fail every open stream, loudly
            log.exception("engine thread crashed")
            self.error = exc
            dead = EngineDeadError(f"engine crashed: {exc!r}")
            for stream in list(self._streams.values()):
                self._loop.call_soon_threadsafe(stream.put_nowait, dead)
            self._streams.clear()

    def _drain_commands(self, block: bool) -> None:
        while True:
            try:
                cmd = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if cmd is None:
                return
            if isinstance(cmd, _Add):
                try:
                    if cmd.before is not None:
                        cmd.before(self.engine)
                    self.engine.add_request(
                        cmd.request_id, cmd.prompt, cmd.params, cmd.hold_blocks, cmd.cache_salt, cmd.rank
                    )
                except Exception as exc:
                    if cmd.accepted is None:
                        self._loop.call_soon_threadsafe(cmd.stream.put_nowait, exc)
                    else:
                        self._loop.call_soon_threadsafe(_settle, cmd.accepted, exc)
                    continue
                self._streams[cmd.request_id] = cmd.stream
                if cmd.accepted is not None:
                    self._loop.call_soon_threadsafe(_settle, cmd.accepted, None)
            elif isinstance(cmd, _Abort):
                self.engine.abort_request(cmd.request_id)
            elif isinstance(cmd, _Call):
                try:
                    result = cmd.fn(self.engine)
                except Exception as exc:
                    self._loop.call_soon_threadsafe(_settle, cmd.done, exc)
                else:
                    self._loop.call_soon_threadsafe(_settle_value, cmd.done, result)
                self.stats = self.engine.stats()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        batch = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            batch.append((stream, out))
        if batch:
            self._loop.call_soon_threadsafe(_put_all, batch)


def _settle(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


def _settle_value(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream, out in batch:
        stream.put_nowait(out)
