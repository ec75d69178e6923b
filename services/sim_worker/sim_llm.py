"""SimLLM: AsyncLLM's interface over a SimCore, stepping in real time on the event loop.

WorkerService takes it in place of an AsyncLLM, so a simulated worker speaks exactly the worker's
NATS protocol (generate / abort / stats, token streams, heartbeats, KV events) from the same code.
No thread: each step is planned (scheduled and costed) at once, then the loop sleeps for the
modelled duration (divided by `speedup`) and applies it: its tokens and KV events come out when
they would after a real forward. Aborts wait for the step in progress, as with the real engine.
Hundreds of SimLLMs share one event loop.

Steps are timed against a running clock (the end of the previous step), so sleep granularity does
not accumulate; when the loop is too busy to wake a worker in time, the step ends late and the lag
is counted (`lag_s_total`, `late_steps`): a saturated host shows up instead of silently slowing
the simulation down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from kvmesh.libs.engine.async_engine import EngineDeadError, StreamingLLM
from kvmesh.libs.engine.introspection import EngineStats
from kvmesh.libs.engine.outputs import RequestOutput
from kvmesh.libs.engine.sampling_params import InvalidRequestError, SamplingParams
from kvmesh.schemas.kv_events import KVEvent
from kvmesh.services.sim_worker.core import SimCore

log = logging.getLogger(__name__)
LATE_S = 0.005  # a step that ends this much after its modelled end counts as late


class SimLLM(StreamingLLM):
    def __init__(self, core: SimCore, speedup: float = 1.0) -> None:
        if speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        self.core = core
        self.engine = core  # what WorkerService reads its engine config from, as on an AsyncLLM
        self.speedup = speedup
        self.stats: EngineStats = core.stats()
        self.error: BaseException | None = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._aborts: list[str] = []
        self._events: deque[KVEvent] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.steps = 0
        self.busy_s = 0.0  # modelled engine time (before speedup)
        self.lag_s_total = 0.0
        self.late_steps = 0

    # -- AsyncLLM's interface -----------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def ready(self) -> SimCore:
        self.start()
        return self.core

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        hold_blocks: bool = False,
        before: Callable[[SimCore], object] | None = None,
        cache_salt: str | None = None,
        rank: tuple[int, int] = (0, 0),  # the real scheduler's order; the simulator's is FCFS
    ) -> asyncio.Queue:
        """Queue a request; returns the queue its RequestOutputs arrive on. Raises
        InvalidRequestError at once if the engine would refuse it."""
        self.start()
        if self.error is not None or self._stopping:
            raise EngineDeadError("the simulated engine is not running") from self.error
        if hold_blocks or before is not None:
            raise InvalidRequestError("role", "simulated workers run the aggregated role only")
        if isinstance(prompt, str):
            raise InvalidRequestError("prompt", "simulated workers take token ids, not text")
        self.core.add_request(request_id, prompt, params, cache_salt)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self.stats = self.core.stats()
        self._wake.set()
        return stream

    async def call(self, fn: Callable[[SimCore], object]) -> object:
        """Run `fn(core)` between two steps (there is no engine thread: now is between steps)."""
        return fn(self.core)

    def abort(self, request_id: str) -> None:
        """Cancel a request; applied before the next step, like the real engine's command queue."""
        self._aborts.append(request_id)
        self._wake.set()

    def take_kv_events(self) -> list[KVEvent]:
        events = list(self._events)
        self._events.clear()
        return events

    def shutdown(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()

    # -- the stepping loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        clock = loop.time()  # when the previous step ended (modelled)
        try:
            while not self._stopping:
                if not self._aborts and not self.core.has_unfinished_requests():
                    self._wake.clear()
                    await self._wake.wait()
                    clock = loop.time()
                for rid in self._aborts:
                    self.core.abort_request(rid)
                self._aborts.clear()
                planned = self.core.plan()
                if planned.duration_s > 0:
                    end = max(clock, loop.time()) + planned.duration_s / self.speedup
                    await asyncio.sleep(end - loop.time())
                    lag = loop.time() - end
                    if lag > LATE_S:
                        self.late_steps += 1
                        self.lag_s_total += lag
                    clock = end
                    self.steps += 1
                    self.busy_s += planned.duration_s
                outputs = self.core.apply(planned)
                events = self.core.take_kv_events()
                if planned.duration_s == 0 and not outputs:  # nothing could be scheduled: never spin
                    await asyncio.sleep(0.001)
                self._events.extend(events)
                self.stats = self.core.stats()
                self._deliver(outputs)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # a bug in the simulation: fail every open stream, loudly
            log.exception("simulated engine crashed")
            self.error = exc
            dead = EngineDeadError(f"simulated engine crashed: {exc!r}")
            for stream in self._streams.values():
                stream.put_nowait(dead)
            self._streams.clear()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put_nowait(out)


async def close_all(llms: list[SimLLM]) -> None:
    """Stop every simulated engine and wait for their loops to end."""
    for llm in llms:
        llm.shutdown()
    tasks = [llm._task for llm in llms if llm._task is not None]
    with contextlib.suppress(Exception):
        await asyncio.gather(*tasks, return_exceptions=True)
