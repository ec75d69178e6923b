"""A real OTLP/HTTP trace receiver (ExportTraceServiceRequest protobufs, as a collector gets them) and
a real mesh exporting to it: nats-server, redis-server, kv-index, tokenizer, router, two workers on
the tiny random model (with the real tokenizer) and the gateway, each its own process."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from kvmesh.libs.launcher import Mesh, MeshConfig


class SpanRecord(NamedTuple):
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind: 1 internal, 2 server, 3 client
    service: str
    attributes: dict[str, Any]
    start_ns: int
    end_ns: int
    status: int  # 0 unset, 1 ok, 2 error


def _value(v) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


class OTLPReceiver:
    """POST /v1/traces -> decoded spans, kept in arrival order."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                receiver._add(ExportTraceServiceRequest.FromString(body))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _add(self, req: ExportTraceServiceRequest) -> None:
        records = []
        for rs in req.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    records.append(
                        SpanRecord(
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            s.name,
                            s.kind,
                            resource.get("service.name", ""),
                            {kv.key: _value(kv.value) for kv in s.attributes},
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                            s.status.code,
                        )
                    )
        with self._lock:
            self.spans.extend(records)
            self.requests += 1

    def snapshot(self) -> list[SpanRecord]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, done: Callable[[list[SpanRecord]], bool], timeout: float = 60.0) -> list[SpanRecord]:
        """The spans received, once `done(spans)` holds (spans are exported in batches, ~0.1 s apart
        here); raises after `timeout` with what did arrive."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.snapshot()
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({(s.service, s.name) for s in spans})
                raise AssertionError(f"spans never complete; received {len(spans)}: {names}")
            time.sleep(0.1)

    def __enter__(self) -> OTLPReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="package")
def otlp() -> OTLPReceiver:
    with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="package")
def traced_mesh(tiny_chat_model_path, otlp, tmp_path_factory) -> Mesh:
    config = MeshConfig(
        model=str(tiny_chat_model_path),
        dtype="float32",
        num_workers=2,  # so that the router asks the kv-index (it does not with one worker)
        worker_args=["--num-kv-blocks", "512", "--heartbeat-interval", "0.5"],
        log_dir=tmp_path_factory.mktemp("traced-mesh-logs"),
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,  # http/protobuf to {endpoint}/v1/traces
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export every 0.1 s instead of 5 s
        },
    )
    with Mesh(config) as mesh:
        mesh.wait_ready(timeout=180)
        yield mesh
