"""A worker's metrics and spans per request, fed by the engine's outputs.

`kvmesh.worker.request` covers a request's life on this worker (accepted -> finished) as a child of
the bus's `kvmesh.worker.*.generate` SERVER span; when it finishes, the engine's own timestamps
(RequestOutput.timing) become its `queue`, `prefill` and `decode` child spans and vLLM's
queue/prefill/decode histograms. Nothing here runs per token except one counter increment.

Hook for disaggregated prefill (the decode side): make the request span current while pulling, and
wrap the pull in libs.tracing.kv_transfer_span, which also counts kvmesh:kv_transfer_*:

    with telemetry.active(), kv_transfer_span(prefill_worker, n_blocks, n_bytes, telemetry.metrics):
        ...NIXL READ...
    telemetry.prefill_where = "remote"  # kvmesh:prefill_requests_total{where="remote"}

A prefill-role worker, which prefills for another worker's stream, opens the same span with
`start_prefill` (`prefill_where = None`): its prompt tokens and prefill time are its own, but the
request is counted once, by the worker that streams it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.trace import Span

from kvmesh.libs import tracing
from kvmesh.libs.engine.outputs import RequestOutput, RequestTiming
from kvmesh.libs.metrics import WorkerMetrics, model_label
from kvmesh.schemas.messages import GenerateRequest
from kvmesh.schemas.transfer import PrefillRequest

REQUEST_SPAN = "kvmesh.worker.request"


class WorkerTelemetry:
    """One per worker: its bound metrics, and a RequestTelemetry per accepted request."""

    def __init__(self, model: str, worker_id: str, block_size: int = 16) -> None:
        self.worker_id = worker_id
        self.block_size = block_size
        self.metrics = WorkerMetrics(model_label(model), worker_id)

    def start(self, req: GenerateRequest) -> RequestTelemetry:
        """Open the request's span under the current context (the generate request's)."""
        return self._start(req.request_id, len(req.token_ids), req.sampling.max_tokens, "local")

    def start_prefill(self, req: PrefillRequest) -> RequestTelemetry:
        """A prefill-role worker's part of another worker's request: its span (under the prefill
        request's) and prompt tokens; the request itself is counted by the worker that streams it."""
        return self._start(req.request_id, len(req.token_ids), 0, None)

    def _start(
        self, request_id: str, num_prompt_tokens: int, max_tokens: int, prefill_where: str | None
    ) -> RequestTelemetry:
        attributes = {
            tracing.REQUEST_ID: request_id,
            tracing.WORKER_ID: self.worker_id,
            tracing.PROMPT_TOKENS: num_prompt_tokens,
        }
        if prefill_where is not None:
            attributes["gen_ai.request.max_tokens"] = max_tokens
        span = tracing.tracer.start_span(REQUEST_SPAN, attributes=attributes)
        telemetry = RequestTelemetry(self, span)
        telemetry.prefill_where = prefill_where
        return telemetry


class RequestTelemetry:
    def __init__(self, owner: WorkerTelemetry, span: Span) -> None:
        self._owner = owner
        self._metrics = owner.metrics
        self.span = span
        self.prefill_where: str | None = "local"
        self._prefilled = False
        self._ended = False

    @property
    def metrics(self) -> WorkerMetrics:
        return self._metrics

    @contextlib.contextmanager
    def active(self) -> Iterator[Span]:
        """Make the request's span current (for child spans such as kvmesh.kv_transfer)."""
        with trace.use_span(self.span, end_on_exit=False):
            yield self.span

    def output(self, out: RequestOutput) -> None:
        """Every engine output of the request, in order."""
        n = len(out.new_token_ids)
        if n:
            self._metrics.generation_tokens.inc(n)
            if not self._prefilled:
                self._prefill_done(out)
        if out.finished:
            self._finish(out)

    def fail(self, error: BaseException | str) -> None:
        """The request could not run or stream (the engine refused it, the stream broke)."""
        if not self._ended:
            self._ended = True
            tracing.end_span(self.span, error)

    def _prefill_done(self, out: RequestOutput) -> None:
        self._prefilled = True
        self._metrics.prompt_tokens.inc(out.num_prompt_tokens)
        if self.prefill_where is not None:
            self._metrics.prefill(self.prefill_where)

    def _finish(self, out: RequestOutput) -> None:
        if self._ended:
            return
        self._ended = True
        span = self.span
        timing = out.timing
        offset = tracing.monotonic_to_wall_ns()
        if timing is not None:
            self._observe(timing)
        if span.is_recording():
            span.set_attributes(
                {
                    tracing.OUTPUT_TOKENS: out.num_output_tokens,
                    tracing.CACHED_TOKENS: out.num_cached_tokens,
                    tracing.CACHED_BLOCKS: out.num_cached_tokens // self._owner.block_size,
                    tracing.FINISH_REASON: [out.finish_reason or "abort"],
                    "kvmesh.prefill": self.prefill_where or "none",
                }
            )
            if timing is not None:
                self._phase_spans(timing, offset)
        end = tracing.wall_ns(timing.finished, offset) if timing is not None else None
        tracing.end_span(span, end_time=end)

    def _observe(self, t: RequestTiming) -> None:
        m = self._metrics
        if t.scheduled is not None:
            m.queue_time.observe(t.scheduled - t.arrival)
            if t.first_token is not None:
                m.prefill_time.observe(t.first_token - t.scheduled)
                m.decode_time.observe(t.finished - t.first_token)

    def _phase_spans(self, t: RequestTiming, offset: int) -> None:
        """queue / prefill / decode as child spans timed by the engine: no span per token."""
        span = self.span
        span.set_attribute("kvmesh.num_preemptions", t.num_preemptions)
        ctx = trace.set_span_in_context(span)
        phases = [("queue", t.arrival, t.scheduled)]
        if t.scheduled is not None:
            phases += [("prefill", t.scheduled, t.first_token)]
            if t.first_token is not None:
                phases += [("decode", t.first_token, t.finished)]
        for name, start, end in phases:
            if end is None:
                end = t.finished  # aborted during this phase
            span.set_attribute(f"kvmesh.{name}_time_s", end - start)
            child = tracing.tracer.start_span(
                f"kvmesh.worker.{name}", context=ctx, start_time=tracing.wall_ns(start, offset)
            )
            child.end(end_time=tracing.wall_ns(end, offset))
