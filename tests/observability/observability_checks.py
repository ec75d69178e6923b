"""Shared checks of the observability tests: scraping /metrics with prometheus_client's parser, and
finding a request's spans among those the OTLP receiver got."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

SERVER, CLIENT = 2, 3  # OTLP span kinds


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics page."""
    r = httpx.get(url, timeout=10)
    r.raise_for_status()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def has(samples: dict, name: str, **labels: str) -> bool:
    """Whether the page holds a series called `name` whose labels include `labels`."""
    want = set(labels.items())
    return any(n == name and want <= set(ls) for n, ls in samples)


def measured(samples: dict, name: str, **labels: str) -> float:
    """`total`, for a series that must be there: a missing series fails instead of reading as 0."""
    assert has(samples, name, **labels), f"no series {name}{labels or ''} on this /metrics page"
    return total(samples, name, **labels)


def label_values(samples: dict, name: str, label: str) -> set[str]:
    return {dict(ls)[label] for (n, ls), _ in samples.items() if n == name and label in dict(ls)}


def complete_trace(request_id: str):
    """A predicate: the request's trace has arrived whole (the HTTP root, the gateway's request span,
    the worker's phases)."""

    def done(spans) -> bool:
        ids = {s.trace_id for s in spans if s.attributes.get("kvmesh.request_id") == request_id}
        if len(ids) != 1:
            return False
        trace = [s for s in spans if s.trace_id in ids]
        names = {s.name for s in trace}
        has_root = any(not s.parent_id for s in trace)
        return (
            has_root
            and {"kvmesh.gateway.request", "kvmesh.worker.decode", "kvmesh.tokenizer.encode"} <= names
        )

    return done


def trace_of(spans, request_id: str):
    ids = {s.trace_id for s in spans if s.attributes.get("kvmesh.request_id") == request_id}
    assert len(ids) == 1, f"request {request_id} spans {len(ids)} traces"
    return [s for s in spans if s.trace_id in ids]


def one(spans, name: str, service: str, kind: int | None = None):
    found = [s for s in spans if s.name == name and s.service == service and kind in (None, s.kind)]
    assert len(found) == 1, f"{service}/{name}: {len(found)} spans"
    return found[0]
