"""OpenTelemetry traces: SDK setup from the standard OTEL_* variables, and the span vocabulary kvmesh
shares across services.

One trace per request: the gateway opens `kvmesh.gateway.request`; every NATS request made inside it
gets a CLIENT span whose context travels in the message's headers (W3C traceparent, libs/bus.py), and
the service that answers opens a SERVER span under it. Services add their attributes to the current
span (`trace.get_current_span().set_attributes(...)`). Streams carry no trace headers and no span is
ever made per token chunk: the worker's `kvmesh.worker.request` span covers the request's life, with
queue / prefill / decode child spans timed by the engine's own timestamps.

Off by default: nothing is exported (and the API stays a no-op) unless OTEL_TRACES_EXPORTER or an
OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set. Exporter:
OTLP over http/protobuf (OTEL_EXPORTER_OTLP_*), or `console`. Batching (OTEL_BSP_*), sampling
(OTEL_TRACES_SAMPLER) and extra resource attributes (OTEL_RESOURCE_ATTRIBUTES) follow the SDK's
variables. service.name is `kvmesh-<service>` unless OTEL_SERVICE_NAME is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

log = logging.getLogger(__name__)

tracer = trace.get_tracer("kvmesh")  # a proxy: real once setup_tracing() installs a provider

# Attribute names (OpenTelemetry's GenAI conventions where they exist).
REQUEST_ID = "kvmesh.request_id"
MODEL = "gen_ai.request.model"
PROMPT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
FINISH_REASON = "gen_ai.response.finish_reasons"
CACHED_TOKENS = "kvmesh.cached_tokens"  # prompt tokens served from a prefix cache
CACHED_BLOCKS = "kvmesh.cached_blocks"
WORKER_ID = "kvmesh.worker_id"
ERROR_CODE = "kvmesh.error_code"
# KV transfer (disaggregated prefill): set by kv_transfer_span
TRANSFER_SPAN = "kvmesh.kv_transfer"
TRANSFER_BYTES = "kvmesh.kv_transfer.bytes"
TRANSFER_BLOCKS = "kvmesh.kv_transfer.blocks"
TRANSFER_PEER = "kvmesh.kv_transfer.peer"

_OTLP_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def exporter_names() -> list[str]:
    """The trace exporters the environment asks for ([] = tracing off)."""
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        return []
    names = [n.strip().lower() for n in _env("OTEL_TRACES_EXPORTER").split(",") if n.strip()]
    if not names:
        names = ["otlp"] if any(_env(v) for v in _OTLP_ENDPOINT_VARS) else []
    return [n for n in names if n != "none"]


def _exporter(name: str):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none): ignored", name)
        return None
    protocol = _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != "http/protobuf":
        log.warning("OTLP protocol %s is not installed here: exporting over http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: from OTEL_EXPORTER_OTLP_*


def setup_tracing(service: str, instance_id: str | None = None) -> bool:
    """Install the SDK's tracer provider for this process if the environment asks for traces.
    Returns whether spans are exported. Call once, early, from the service's entry point."""
    names = exporter_names()
    exporters = [e for e in (_exporter(n) for n in names) if e is not None]
    if not exporters:
        return False
    from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(
        {
            SERVICE_NAME: _env("OTEL_SERVICE_NAME") or f"kvmesh-{service}",
            SERVICE_INSTANCE_ID: instance_id or f"{socket.gethostname()}-{os.getpid()}",
        }
    )
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER; flushes at exit
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* tune it
    trace.set_tracer_provider(provider)
    log.info("tracing on: %s exports %s", resource.attributes[SERVICE_NAME], ", ".join(names))
    return True


def in_trace(ctx: otel_context.Context | None = None) -> bool:
    """Whether `ctx` (default: the current context) belongs to a request's trace."""
    return trace.get_current_span(ctx).get_span_context().is_valid


def monotonic_to_wall_ns() -> int:
    """What to add to time.monotonic() nanoseconds to get epoch nanoseconds, right now. Convert
    several readings with one offset, so that equal readings stay equal."""
    return time.time_ns() - time.monotonic_ns()


def wall_ns(monotonic_s: float, offset_ns: int | None = None) -> int:
    """A time.monotonic() reading as the epoch nanoseconds spans want (the engine times requests in
    monotonic seconds)."""
    return (monotonic_to_wall_ns() if offset_ns is None else offset_ns) + int(monotonic_s * 1e9)


def end_span(span: Span, error: BaseException | str | None = None, end_time: int | None = None) -> None:
    """End `span`, marked failed when `error` is given."""
    if error is not None:
        if isinstance(error, BaseException):
            span.record_exception(error)
            error = f"{type(error).__name__}: {error}"
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=end_time)


@contextlib.contextmanager
def kv_transfer_span(peer: str, num_blocks: int, num_bytes: int, metrics=None) -> Iterator[Span]:
    """The hook for disaggregated prefill: wrap one request's KV pull in it, on the decode worker,
    while its `kvmesh.worker.request` span is current (WorkerRequestTelemetry.active()):

        with kv_transfer_span(prefill_worker_id, len(block_ids), nbytes, telemetry.metrics):
            ...NIXL READ...

    It records the span `kvmesh.kv_transfer` (peer, blocks, bytes; failed if the block raises) and,
    when `metrics` (a libs.metrics.WorkerMetrics) is given and the pull succeeds,
    kvmesh:kv_transfer_bytes/blocks_total and kvmesh:kv_transfer_seconds."""
    attributes = {TRANSFER_PEER: peer, TRANSFER_BLOCKS: num_blocks, TRANSFER_BYTES: num_bytes}
    span = tracer.start_span(TRANSFER_SPAN, kind=SpanKind.CLIENT, attributes=attributes)
    start = time.perf_counter()
    try:
        with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield span
    except BaseException as exc:
        end_span(span, exc)
        raise
    span.end()
    if metrics is not None:
        metrics.kv_transfer(num_blocks, num_bytes, time.perf_counter() - start)


# --- the bus's spans (libs/bus.py) ----------------------------------------------------------------


def client_span(subject_label: str, subject: str) -> Span | None:
    """A CLIENT span for a NATS request made inside a request's trace (None outside any trace:
    readiness probes, heartbeats and the like make no traces of their own)."""
    if not in_trace():
        return None
    return tracer.start_span(
        subject_label,
        kind=SpanKind.CLIENT,
        attributes={"messaging.system": "nats", "messaging.destination.name": subject},
    )


def server_span(subject_label: str, subject: str, parent: otel_context.Context) -> Span | None:
    """A SERVER span for a message that arrived with a trace context (None for untraced messages)."""
    if not in_trace(parent):
        return None
    return tracer.start_span(
        subject_label,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"messaging.system": "nats", "messaging.destination.name": subject},
    )
