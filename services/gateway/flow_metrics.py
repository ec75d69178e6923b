"""Flow control's metrics, read from the gateway's FlowController when Prometheus scrapes (no mirror
kept up to date on the request path), plus the queue-time histogram observed per request.

- `kvmesh:gateway_queue_depth{priority, tenant}`: requests waiting (the 20 tenants with the most
  waiting by name, the rest summed as tenant="other"); `kvmesh:gateway_queue_inflight` and
  `kvmesh:gateway_queue_capacity` (what the workers have room for; absent while no worker reported).
- `kvmesh:gateway_queue_requests_total{outcome, reason}`: dispatched / rejected (queue_full, ttl) /
  dropped (client_gone).
- `kvmesh:gateway_queue_time_seconds`: time each request waited for room (0 for most when idle).
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvmesh.libs.metrics import MODEL, PHASE_BUCKETS
from kvmesh.services.gateway.flow import FlowController

TOP_TENANTS = 20  # tenants named in the depth gauge; the rest are "other" (bounded label values)

QUEUE_TIME = Histogram(
    "kvmesh:gateway_queue_time_seconds",
    "Time a generation request waited in the gateway's flow-control queue for room on the workers.",
    [MODEL],
    buckets=PHASE_BUCKETS,
)

_OUTCOMES = {
    "dispatched": ("dispatched", ""),
    "rejected_full": ("rejected", "queue_full"),
    "rejected_ttl": ("rejected", "ttl"),
    "dropped": ("dropped", "client_gone"),
}


class FlowCollector(Collector):
    """Every live gateway FlowController in this process, by model (held weakly)."""

    def __init__(self) -> None:
        self._flows: weakref.WeakKeyDictionary[FlowController, str] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def add(self, flow: FlowController, model: str) -> None:
        with self._lock:
            self._flows[flow] = model

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self._lock:
            flows = list(self._flows.items())
        depth = GaugeMetricFamily(
            "kvmesh:gateway_queue_depth",
            "Generation requests waiting in the gateway's queue, by priority band and tenant.",
            labels=[MODEL, "priority", "tenant"],
        )
        inflight = GaugeMetricFamily(
            "kvmesh:gateway_queue_inflight",
            "Generation requests this gateway has on the workers (holding a flow-control slot).",
            labels=[MODEL],
        )
        capacity = GaugeMetricFamily(
            "kvmesh:gateway_queue_capacity",
            "Requests the workers have room for, by their heartbeats (absent: no worker reported).",
            labels=[MODEL],
        )
        outcomes = CounterMetricFamily(
            "kvmesh:gateway_queue_requests",
            "Generation requests through flow control: dispatched, rejected (reason) or dropped (reason).",
            labels=[MODEL, "outcome", "reason"],
        )
        for flow, model in flows:
            by_tenant: Tally[tuple[int, str]] = Tally(flow.depth())
            named = {t for (_, t), _n in by_tenant.most_common(TOP_TENANTS)}
            folded: Tally[tuple[int, str]] = Tally()
            for (priority, tenant), n in by_tenant.items():
                folded[(priority, tenant if tenant in named else "other")] += n
            for (priority, tenant), n in sorted(folded.items()):
                depth.add_metric([model, str(priority), tenant], n)
            inflight.add_metric([model], flow.inflight)
            if (cap := flow.capacity()) is not None:
                capacity.add_metric([model], cap)
            for key, (outcome, reason) in _OUTCOMES.items():
                outcomes.add_metric([model, outcome, reason], flow.counts[key])
        yield from (depth, inflight, capacity, outcomes)


FLOWS = FlowCollector()
REGISTRY.register(FLOWS)
