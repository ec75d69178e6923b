"""Every Prometheus metric kvmesh exports, defined once, with vLLM's names and meanings where vLLM has
one (so vLLM's Grafana dashboards work on a kvmesh mesh) and `kvmesh:` names for the mesh's own.

Labels: `model_name` on everything a service knows the model of, plus `worker_id` on worker metrics.
Each service binds its label values once (`GatewayMetrics(model)`, `WorkerMetrics(model, worker)`, ...)
so the hot paths only call `.inc()` / `.observe()` on pre-bound children.

Worker state (running/waiting requests, KV usage, the engine's cumulative prefix-cache and preemption
counts) is not mirrored into metric objects on every step: `WORKER_STATS` reads each registered
worker's `WorkerStats` when Prometheus scrapes, so the numbers are exactly the engine's.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import REGISTRY, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvmesh.schemas.messages import WorkerStats

# `*_created` series double every counter's and histogram's output for little use; vLLM drops them too.
disable_created_metrics()

MODEL = "model_name"
WORKER = "worker_id"

# vLLM's buckets, so that panels and SLO queries written for vLLM mean the same here.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# Queue, prefill and decode phases are often far below a second on a mesh: finer at the low end.
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, *REQUEST_BUCKETS)
TOKEN_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5))  # 1, 2, 5, 10, ... 500,000
# Control-plane latencies: NATS request/reply (~100 us on loopback), routing decisions, KV pulls.
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0)  # fmt: skip
# Routing decisions: fine below 5 ms, where the target (p99 <= 2 ms with 256 workers) lies.
DECISION_BUCKETS = (0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002,
                    0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)  # fmt: skip

# --- gateway (per request, as the client sees it) -------------------------------------------------
TIME_TO_FIRST_TOKEN = Histogram(
    "vllm:time_to_first_token_seconds",
    "Time from the request's arrival at the gateway to its first output token.",
    [MODEL],
    buckets=TTFT_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "vllm:inter_token_latency_seconds",
    "Time between two consecutive token chunks of a request at the gateway (one chunk per engine step).",
    [MODEL],
    buckets=ITL_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "vllm:time_per_output_token_seconds",
    "Per request: (e2e latency - time to first token) / (output tokens - 1).",
    [MODEL],
    buckets=ITL_BUCKETS,
)
E2E_REQUEST_LATENCY = Histogram(
    "vllm:e2e_request_latency_seconds",
    "Time from the request's arrival at the gateway to its last token.",
    [MODEL],
    buckets=REQUEST_BUCKETS,
)
REQUEST_PROMPT_TOKENS = Histogram(
    "vllm:request_prompt_tokens", "Prompt tokens of finished requests.", [MODEL], buckets=TOKEN_BUCKETS
)
REQUEST_GENERATION_TOKENS = Histogram(
    "vllm:request_generation_tokens",
    "Output tokens of finished requests.",
    [MODEL],
    buckets=TOKEN_BUCKETS,
)
REQUEST_SUCCESS = Counter(
    "vllm:request_success",
    "Requests that finished, by finish reason (stop | length | abort).",
    [MODEL, "finished_reason"],
)
GATEWAY_REQUESTS = Counter(
    "kvmesh:gateway_requests", "HTTP requests answered by the gateway, by status code.", [MODEL, "status"]
)
GATEWAY_REJECTED = Counter(
    "kvmesh:gateway_rejected",
    "Requests refused before reaching a worker (admission control, auth, limits), by reason.",
    [MODEL, "reason"],
)
GATEWAY_REJECTION_TIME = Histogram(
    "kvmesh:gateway_rejection_seconds",
    "Time from a refused request's arrival at the gateway's app to the start of its refusal, by reason.",
    [MODEL, "reason"],
    buckets=FAST_BUCKETS,
)

# --- worker (engine) -------------------------------------------------------------------------------
PROMPT_TOKENS = Counter(
    "vllm:prompt_tokens", "Prompt tokens prefilled (cached ones included).", [MODEL, WORKER]
)
GENERATION_TOKENS = Counter("vllm:generation_tokens", "Output tokens generated.", [MODEL, WORKER])
REQUEST_QUEUE_TIME = Histogram(
    "vllm:request_queue_time_seconds",
    "Time a request waited in the engine's queue before it was first scheduled.",
    [MODEL, WORKER],
    buckets=PHASE_BUCKETS,
)
REQUEST_PREFILL_TIME = Histogram(
    "vllm:request_prefill_time_seconds",
    "Time from a request's first scheduling to its first token (its prefill).",
    [MODEL, WORKER],
    buckets=PHASE_BUCKETS,
)
REQUEST_DECODE_TIME = Histogram(
    "vllm:request_decode_time_seconds",
    "Time from a request's first token to its last.",
    [MODEL, WORKER],
    buckets=PHASE_BUCKETS,
)

# --- KV transfer (disaggregated prefill; incremented by the worker that pulls) ---------------------
KV_TRANSFER_BYTES = Counter("kvmesh:kv_transfer_bytes", "KV cache bytes pulled over NIXL.", [MODEL, WORKER])
KV_TRANSFER_BLOCKS = Counter(
    "kvmesh:kv_transfer_blocks", "KV cache blocks pulled over NIXL.", [MODEL, WORKER]
)
KV_TRANSFER_SECONDS = Histogram(
    "kvmesh:kv_transfer_seconds",
    "Time of one request's KV pull (NIXL READ of its missing blocks).",
    [MODEL, WORKER],
    buckets=FAST_BUCKETS,
)
PREFILL_REQUESTS = Counter(
    "kvmesh:prefill_requests",
    "Requests by where their prompt was prefilled: local (this worker) or remote (pulled over NIXL).",
    [MODEL, WORKER, "where"],
)

# --- router ------------------------------------------------------------------------------------------
ROUTER_DECISIONS = Counter(
    "kvmesh:router_decisions",
    "Routing decisions by reason (prefix | session | load | only).",
    [MODEL, "reason"],
)
ROUTER_PREFIX_HIT_TOKENS = Counter(
    "kvmesh:router_prefix_hit_tokens",
    "Prompt tokens already cached on the chosen worker (achieved prefix reuse).",
    [MODEL],
)
ROUTER_PREFIX_AVAILABLE_TOKENS = Counter(
    "kvmesh:router_prefix_available_tokens",
    "Prompt tokens cached on the best-holding worker at decision time (the reuse that was available).",
    [MODEL],
)
ROUTER_WORKERS_REFUSED = Counter(
    "kvmesh:router_workers_refused",
    "Workers refused because their KV contract differs from the router's, by the field that differs "
    "(block_size | hash_seed | hash_namespace | version | cache_salt_rule); counted once per refusal.",
    [MODEL, "reason"],
)
ROUTER_DECISION_SECONDS = Histogram(
    "kvmesh:router_decision_seconds",
    "Time to pick a worker (KV index lookup included).",
    [MODEL],
    buckets=DECISION_BUCKETS,
)

# --- bus ---------------------------------------------------------------------------------------------
NATS_REQUEST_SECONDS = Histogram(
    "kvmesh:nats_request_seconds",
    "NATS request/reply latency seen by the requester, by subject (ids replaced by *).",
    ["subject"],
    buckets=FAST_BUCKETS,
)


def model_label(model: str) -> str:
    """The `model_name` label of a model given by name or by folder: its last path component."""
    return Path(model).name or model


def subject_label(subject: str) -> str:
    """A subject without its per-worker / per-request ids, for a bounded label set:
    kvmesh.worker.<id>.generate -> kvmesh.worker.*.generate."""
    parts = subject.split(".")
    if len(parts) <= 3:
        return subject
    return f"{parts[0]}.{parts[1]}.*.{parts[-1]}"


class GatewayMetrics:
    """The gateway's metrics for one served model, children bound once."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.ttft = TIME_TO_FIRST_TOKEN.labels(model)
        self.itl = INTER_TOKEN_LATENCY.labels(model)
        self.tpot = TIME_PER_OUTPUT_TOKEN.labels(model)
        self.e2e = E2E_REQUEST_LATENCY.labels(model)
        self.prompt_tokens = REQUEST_PROMPT_TOKENS.labels(model)
        self.generation_tokens = REQUEST_GENERATION_TOKENS.labels(model)

    def success(self, finish_reason: str) -> None:
        REQUEST_SUCCESS.labels(self.model, finish_reason).inc()

    def status(self, code: int) -> None:
        GATEWAY_REQUESTS.labels(self.model, str(code)).inc()

    def rejected(self, reason: str, seconds: float) -> None:
        """For admission control: a request refused before any worker saw it, `seconds` after it
        reached the app."""
        GATEWAY_REJECTED.labels(self.model, reason).inc()
        GATEWAY_REJECTION_TIME.labels(self.model, reason).observe(seconds)


class WorkerMetrics:
    """One worker's event metrics (its state comes from WORKER_STATS at scrape time)."""

    def __init__(self, model: str, worker_id: str) -> None:
        self.model = model
        self.worker_id = worker_id
        self.prompt_tokens = PROMPT_TOKENS.labels(model, worker_id)
        self.generation_tokens = GENERATION_TOKENS.labels(model, worker_id)
        self.queue_time = REQUEST_QUEUE_TIME.labels(model, worker_id)
        self.prefill_time = REQUEST_PREFILL_TIME.labels(model, worker_id)
        self.decode_time = REQUEST_DECODE_TIME.labels(model, worker_id)
        self.kv_transfer_bytes = KV_TRANSFER_BYTES.labels(model, worker_id)
        self.kv_transfer_blocks = KV_TRANSFER_BLOCKS.labels(model, worker_id)
        self.kv_transfer_seconds = KV_TRANSFER_SECONDS.labels(model, worker_id)

    def prefill(self, where: str) -> None:
        """Count one request's prefill: where="local" or "remote" (its blocks pulled over NIXL)."""
        PREFILL_REQUESTS.labels(self.model, self.worker_id, where).inc()

    def kv_transfer(self, num_blocks: int, num_bytes: int, seconds: float) -> None:
        """Count one finished KV pull (see libs/tracing.py kv_transfer_span, which calls this)."""
        self.kv_transfer_blocks.inc(num_blocks)
        self.kv_transfer_bytes.inc(num_bytes)
        self.kv_transfer_seconds.observe(seconds)


class RouterMetrics:
    def __init__(self, model: str) -> None:
        self.model = model
        self.hit_tokens = ROUTER_PREFIX_HIT_TOKENS.labels(model)
        self.available_tokens = ROUTER_PREFIX_AVAILABLE_TOKENS.labels(model)
        self.decision_seconds = ROUTER_DECISION_SECONDS.labels(model)

    def decision(self, reason: str, hit_tokens: int, available_tokens: int) -> None:
        """One routing decision: its reason, the prompt tokens cached on the chosen worker and on
        the best-holding one (decision_seconds is observed by the caller around the whole route)."""
        ROUTER_DECISIONS.labels(self.model, reason).inc()
        self.hit_tokens.inc(hit_tokens)
        self.available_tokens.inc(available_tokens)

    def refused(self, reason: str) -> None:
        """A worker refused for its KV contract (`reason`: the field that differs)."""
        ROUTER_WORKERS_REFUSED.labels(self.model, reason).inc()


@contextlib.contextmanager
def timed(histogram) -> Iterator[None]:
    """Observe the block's duration (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - start)


class WorkerStatsCollector(Collector):
    """vLLM's worker state metrics, read from each registered worker's WorkerStats at scrape time:
    running/waiting requests, KV cache usage (0..1), and the engine's cumulative prefix-cache queries
    and hits (in tokens) and preemptions. Several workers may share a process (simulated workers)."""

    def __init__(self) -> None:
        self._sources: dict[str, Callable[[], WorkerStats | None]] = {}
        self._lock = threading.Lock()

    def add(self, worker_id: str, stats: Callable[[], WorkerStats]) -> None:
        """Report `stats()` under `worker_id` until remove(); a bound method is held weakly, so a
        dropped service stops being reported on its own."""
        ref = weakref.WeakMethod(stats) if hasattr(stats, "__self__") else (lambda: stats)
        with self._lock:
            self._sources[worker_id] = lambda: fn() if (fn := ref()) is not None else None

    def remove(self, worker_id: str) -> None:
        with self._lock:
            self._sources.pop(worker_id, None)

    def describe(self) -> list:
        return []  # unchecked collector: the names below are registered nowhere else

    def collect(self) -> Iterator:
        labels = [MODEL, WORKER]
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests in the engine's batch.", labels=labels
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting to be scheduled.", labels=labels
        )
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache usage (1 = full).", labels=labels)
        queries = CounterMetricFamily(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels=labels
        )
        hits = CounterMetricFamily(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels=labels
        )
        preemptions = CounterMetricFamily(
            "vllm:num_preemptions", "Requests preempted (recomputed).", labels=labels
        )
        with self._lock:
            sources = list(self._sources.items())
        for worker_id, source in sources:
            try:
                stats = source()
            except Exception:  # e.g. the engine is still loading: no numbers yet
                stats = None
            if stats is None:
                continue
            values = [model_label(stats.model), worker_id]
            running.add_metric(values, stats.num_running)
            waiting.add_metric(values, stats.num_waiting)
            usage.add_metric(values, stats.kv_usage)
            queries.add_metric(values, stats.prefix_query_tokens)
            hits.add_metric(values, stats.prefix_hit_tokens)
            preemptions.add_metric(values, stats.num_preemptions)
        yield from (running, waiting, usage, queries, hits, preemptions)


WORKER_STATS = WorkerStatsCollector()
REGISTRY.register(WORKER_STATS)
