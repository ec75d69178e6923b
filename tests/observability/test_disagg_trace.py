"""A disaggregated request's trace: the router names the prefill worker, the decode worker's request
span holds the NIXL pull (`kvmesh.kv_transfer`, with its blocks and bytes), the prefill worker's work
hangs under the decode worker's call, and the pull is counted in kvmesh:kv_transfer_* and
kvmesh:prefill_requests_total{where="remote"}."""

from __future__ import annotations

import httpx
import pytest
from observability_checks import SERVER, complete_trace, one, scrape, total, trace_of

from kvmesh.libs.launcher import Mesh, MeshConfig

PROMPT = "Summarize this. " + "The quick brown fox jumps over the lazy dog near the river bank. " * 12


@pytest.fixture(scope="module")
def disagg_mesh(tiny_chat_model_path, otlp, tmp_path_factory) -> Mesh:
    args = ["--num-kv-blocks", "512", "--heartbeat-interval", "0.5"]
    config = MeshConfig(
        model=str(tiny_chat_model_path),
        dtype="float32",
        num_workers=1,  # decode
        num_prefill_workers=1,
        worker_args=args,
        prefill_worker_args=args,
        router_args=["--disagg-min-tokens", "32"],
        log_dir=tmp_path_factory.mktemp("disagg-mesh-logs"),
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    with Mesh(config) as mesh:
        mesh.wait_ready(timeout=180)
        yield mesh


def test_the_prefill_and_the_kv_transfer_are_in_the_request_trace(disagg_mesh, otlp):
    decode = disagg_mesh.metrics_urls["worker-0"]
    before = scrape(decode)
    prefill_before = scrape(disagg_mesh.metrics_urls["prefill-0"])
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "ignore_eos": True}
    r = httpx.post(f"{disagg_mesh.base_url}/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    request_id = r.json()["id"]

    def done(spans) -> bool:
        return (
            complete_trace(request_id)(spans)
            and any(s.name == "kvmesh.kv_transfer" for s in spans)
            and sum(
                s.name == "kvmesh.worker.request" and s.attributes.get("kvmesh.request_id") == request_id
                for s in spans
            )
            == 2
        )

    trace = trace_of(otlp.wait_for(done), request_id)
    by_id = {s.span_id: s for s in trace}
    route = one(trace, "kvmesh.router.route", "kvmesh-router", SERVER).attributes
    assert route["kvmesh.router.prefill_worker_id"] == "prefill-0"
    assert route["kvmesh.router.prefill_reason"] == "remote"

    works = {s.attributes["kvmesh.worker_id"]: s for s in trace if s.name == "kvmesh.worker.request"}
    assert sorted(works) == ["prefill-0", "worker-0"]
    work = works["worker-0"]
    assert work.attributes["kvmesh.prefill"] == "remote"
    transfer = one(trace, "kvmesh.kv_transfer", "kvmesh-worker")
    assert transfer.parent_id == work.span_id
    assert transfer.attributes["kvmesh.kv_transfer.peer"] == "prefill-0"
    blocks, nbytes = (
        transfer.attributes["kvmesh.kv_transfer.blocks"],
        transfer.attributes["kvmesh.kv_transfer.bytes"],
    )
    assert blocks > 0 and nbytes > 0 and nbytes % blocks == 0
    # the prefill worker's part: its SERVER span under the decode worker's CLIENT call
    prefill = one(trace, "kvmesh.worker.*.prefill", "kvmesh-worker", SERVER)
    assert by_id[prefill.parent_id].service == "kvmesh-worker"
    assert prefill.start_ns <= transfer.start_ns
    # ... and under it, the prefill worker's own request span: the prompt's full blocks, no stream
    remote = works["prefill-0"]
    assert remote.parent_id == prefill.span_id
    assert remote.attributes["kvmesh.prefill"] == "none"
    assert 0 < remote.attributes["gen_ai.usage.input_tokens"] <= work.attributes["gen_ai.usage.input_tokens"]
    assert remote.end_ns <= transfer.start_ns
    prefill_after = scrape(disagg_mesh.metrics_urls["prefill-0"])
    assert (
        total(prefill_after, "vllm:prompt_tokens_total") - total(prefill_before, "vllm:prompt_tokens_total")
        == remote.attributes["gen_ai.usage.input_tokens"]
    )
    assert total(prefill_after, "vllm:request_prefill_time_seconds_count") > total(
        prefill_before, "vllm:request_prefill_time_seconds_count"
    )
    # counted once, by the worker that streams it
    assert total(prefill_after, "kvmesh:prefill_requests_total") == 0

    after = scrape(decode)
    assert (
        total(after, "kvmesh:prefill_requests_total", where="remote")
        - total(before, "kvmesh:prefill_requests_total", where="remote")
        == 1
    )
    assert (
        total(after, "kvmesh:kv_transfer_blocks_total") - total(before, "kvmesh:kv_transfer_blocks_total")
        == blocks
    )
    assert (
        total(after, "kvmesh:kv_transfer_bytes_total") - total(before, "kvmesh:kv_transfer_bytes_total")
        == nbytes
    )
    assert (
        total(after, "kvmesh:kv_transfer_seconds_count") - total(before, "kvmesh:kv_transfer_seconds_count")
        == 1
    )
