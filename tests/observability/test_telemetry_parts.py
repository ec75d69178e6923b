"""The observability parts on their own: the metrics endpoint's health and text on a real NATS
connection, label bounding, the worker-state collector, tracing's off-by-default switch, and the
engine's per-request timing that the worker's spans and histograms are built from."""

from __future__ import annotations

import gc

import httpx
import pytest
from helpers import worker_stats
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.libs.bus import Bus
from kvmesh.libs.metrics import WorkerStatsCollector, subject_label
from kvmesh.libs.metrics_server import MetricsServer
from kvmesh.libs.tracing import exporter_names
from kvmesh.schemas.messages import WorkerStats


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_health_follows_the_nats_attachment_and_metrics_parse(nats_url):
    server = await MetricsServer(0, "127.0.0.1").start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/health")).status_code == 503  # not attached yet
            bus = await Bus.connect(nats_url, "metrics-test")
            server.attached(bus)
            assert (await http.get("/health")).status_code == 200
            r = await http.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            assert "kvmesh:nats_request_seconds" in _families(r.text)
            r = await http.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
            assert r.headers["content-type"].startswith("application/openmetrics-text")
            assert r.text.rstrip().endswith("# EOF")
            assert (await http.get("/nope")).status_code == 404
            assert (await http.post("/metrics")).status_code == 405
            await bus.close()
            assert (await http.get("/health")).status_code == 503  # disconnected
    finally:
        await server.close()


def test_subject_labels_drop_ids():
    assert subject_label("kvmesh.worker.w-1.generate") == "kvmesh.worker.*.generate"
    assert subject_label("kvmesh.worker.host.with.dots.stats") == "kvmesh.worker.*.stats"
    assert subject_label("kvmesh.tokenizer.encode") == "kvmesh.tokenizer.encode"


class _Service:
    def __init__(self, worker_id: str, running: int) -> None:
        self.worker_id, self.running = worker_id, running

    def stats(self) -> WorkerStats:
        return worker_stats(
            self.worker_id,
            model="/models/tiny-chat",
            num_running=self.running,
            num_waiting=2,
            num_free_blocks=75,
            kv_usage=0.25,
            num_preemptions=1,
            prefix_hit_tokens=32,
            prefix_query_tokens=64,
        )


def test_worker_state_is_read_at_scrape_time_and_dropped_with_its_service():
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    collector = WorkerStatsCollector()
    registry.register(collector)
    a, b = _Service("a", 3), _Service("b", 0)
    collector.add("a", a.stats)
    collector.add("b", b.stats)
    a.running = 5  # read when scraped, not when registered
    fams = _families(generate_latest(registry).decode())
    running = {s.labels["worker_id"]: s.value for s in fams["vllm:num_requests_running"].samples}
    assert running == {"a": 5, "b": 0}
    hits = fams["vllm:prefix_cache_hits"].samples[0]
    assert hits.name == "vllm:prefix_cache_hits_total" and hits.value == 32
    assert hits.labels["model_name"] == "tiny-chat"
    assert fams["vllm:kv_cache_usage_perc"].samples[0].value == 0.25
    del b
    gc.collect()
    fams = _families(generate_latest(registry).decode())
    assert [s.labels["worker_id"] for s in fams["vllm:num_requests_waiting"].samples] == ["a"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
    ],
)
def test_tracing_is_off_unless_the_environment_asks(monkeypatch, env, expected):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert exporter_names() == expected


def test_the_final_output_carries_the_engine_timing(tiny_model_path):
    from kvmesh.libs.engine.config import EngineConfig
    from kvmesh.libs.engine.engine import LLMEngine
    from kvmesh.libs.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(tiny_model_path), dtype="float32", num_kv_blocks=64), False)
    engine.add_request("a", list(range(1, 40)), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("b", list(range(1, 40)), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.abort_request("b")  # aborted while waiting: never scheduled
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.timing
            else:
                assert out.timing is None
    a, b = finals["a"], finals["b"]
    assert a.arrival <= a.scheduled <= a.first_token <= a.finished and a.num_preemptions == 0
    assert b.scheduled is None and b.first_token is None and b.arrival <= b.finished


async def test_gateway_counts_answers_by_status_and_refusals_by_reason(nats_url, default_model_path):
    from tokenizers import Tokenizer

    from kvmesh.services.gateway.app import create_app
    from kvmesh.services.gateway.config import GatewayConfig, ServedModel

    config = GatewayConfig(model=str(default_model_path), api_keys=("sesame",), max_body_bytes=2048)
    served = ServedModel.load(config, default_model_path)
    tokenizer = Tokenizer.from_file(str(default_model_path / "tokenizer.json"))
    bus = await Bus.connect(nats_url, "gateway-metrics-test")
    app = create_app(config, bus, tokenizer, served)
    transport = httpx.ASGITransport(app=app)
    labels = {"model_name": served.name}

    async def counts(http: httpx.AsyncClient) -> dict:
        fams = _families((await http.get("/metrics")).text)  # open without a key, like /health
        return {
            (s.name, s.labels.get("status") or s.labels.get("reason")): s.value
            for name in ("kvmesh:gateway_requests", "kvmesh:gateway_rejected")
            if name in fams
            for s in fams[name].samples
            if s.labels["model_name"] == labels["model_name"]
        }

    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            before = await counts(http)
            assert (await http.get("/health")).status_code == 200  # not counted: probes are not traffic
            assert (await http.get("/v1/models")).status_code == 401
            key = {"Authorization": "Bearer sesame"}
            assert (await http.get("/v1/models", headers=key)).status_code == 200
            big = {"prompt": "x" * 4096, "max_tokens": 1}
            assert (await http.post("/v1/completions", json=big, headers=key)).status_code == 413
            after = await counts(http)
    finally:
        await bus.close()

    def delta(key: tuple[str, str]) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta(("kvmesh:gateway_requests_total", "200")) == 1
    assert delta(("kvmesh:gateway_requests_total", "401")) == 1
    assert delta(("kvmesh:gateway_requests_total", "413")) == 1
    assert delta(("kvmesh:gateway_rejected_total", "unauthorized")) == 1
    assert delta(("kvmesh:gateway_rejected_total", "too_large")) == 1
    assert delta(("kvmesh:gateway_rejected_total", "overloaded")) == 0
