"""What a load run is and what it yields: its configuration, one record per request, the result
(openai_load runs it, load_report summarizes and writes it)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class LengthDist:
    """Token lengths: `mean` (fixed), uniform in mean ± spread, or normal(mean, spread); always >= 1."""

    mean: int
    dist: Literal["fixed", "uniform", "normal"] = "fixed"
    spread: float = 0.0

    def __post_init__(self) -> None:
        if self.dist not in ("fixed", "uniform", "normal") or self.mean < 1 or self.spread < 0:
            raise ValueError(f"bad length distribution {self}")

    def sample(self, rng: random.Random) -> int:
        if self.dist == "uniform":
            n = rng.randint(round(self.mean - self.spread), round(self.mean + self.spread))
        elif self.dist == "normal":
            n = round(rng.gauss(self.mean, self.spread))
        else:
            n = self.mean
        return max(1, n)


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """One load run. `base_url` (e.g. http://127.0.0.1:8000/v1) is the only field tied to a server."""

    base_url: str
    model: str
    endpoint: Literal["chat", "completions"] = "chat"
    api_key: str | None = None  # sent as `Authorization: Bearer ...`; never written to results
    concurrency: int | None = None  # closed loop with N clients (default 1 when `rate` is not set)
    rate: float | None = None  # open loop: Poisson arrivals, requests/s; excludes `concurrency`
    num_requests: int = 100  # measured requests
    max_seconds: float | None = None  # no new requests after this; in-flight ones still finish
    warmup: int = 2  # unmeasured requests, one at a time, before the measured window
    prompt_tokens: LengthDist = LengthDist(256)  # user message (salt included), chat template excluded
    output_tokens: LengthDist = LengthDist(128)  # max_tokens of each request
    system_prompt_tokens: int = 0  # one system prompt shared by every request; 0: none
    tokenizer: str | None = None  # HF tokenizer folder: exact prompt lengths instead of word counts
    temperature: float = 0.0
    ignore_eos: bool = True  # extra body field (vLLM, llama.cpp, kvmesh): generate all max_tokens
    timeout: float = 300.0  # s, per request: connect, and longest wait between two bytes
    seed: int = 0  # lengths, prompt words and arrival times (salts are fresh every run)
    label: str = ""
    progress: bool = True  # a progress line on stderr while running

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', not {self.endpoint!r}")
        if self.concurrency is not None and self.rate is not None:
            raise ValueError("set either concurrency (closed loop) or rate (Poisson), not both")
        if (self.concurrency is not None and self.concurrency < 1) or (
            self.rate is not None and self.rate <= 0
        ):
            raise ValueError("concurrency must be >= 1 and rate > 0")
        if self.num_requests < 1 or self.warmup < 0 or self.system_prompt_tokens < 0:
            raise ValueError("num_requests must be >= 1; warmup and system_prompt_tokens >= 0")

    @property
    def mode(self) -> str:
        return (
            f"poisson rate={self.rate}/s" if self.rate is not None else f"concurrency={self.concurrency or 1}"
        )


@dataclass(slots=True)
class RequestRecord:
    """One measured request. Times in seconds; `start`/`end` are offsets from the measured window's start."""

    index: int
    prompt_tokens: int  # our count of the user (+ system) text; exact only with a tokenizer
    max_tokens: int
    start: float = 0.0
    end: float = 0.0
    e2e: float = 0.0
    ttft: float | None = None  # until the first chunk that carries text
    itl: list[float] = field(default_factory=list)  # gaps between consecutive text chunks
    tpot: float | None = None  # (e2e - ttft) / (output_tokens - 1)
    output_tokens: int = 0  # usage.completion_tokens, else the number of text chunks
    server_prompt_tokens: int | None = None  # usage.prompt_tokens (chat template included)
    status: int | None = None  # HTTP status; None when no response arrived
    error: str | None = None  # None: success


@dataclass(slots=True)
class LoadResult:
    config: LoadConfig
    records: list[RequestRecord]
    summary: dict[str, Any]
    started_at: str  # wall clock (UTC, ISO 8601) at the start of the measured window
    warmup_errors: list[str]
