"""Streaming load generator for any OpenAI-compatible server (kvmesh gateway, vLLM, llama.cpp server).

Sends `stream: true` requests to /v1/chat/completions (or /v1/completions) in closed-loop concurrency
(N clients, each sends its next request when its previous one ends) or open-loop Poisson arrivals, and
measures per request: TTFT (first content chunk), ITL (gaps between content chunks, as they arrive),
TPOT ((e2e - ttft) / (output_tokens - 1)), end-to-end latency and output tokens (from the usage chunk).

    python -m kvmesh.loadtest.openai_load --base-url http://127.0.0.1:8000/v1 --model NAME --concurrency 8
    python -m kvmesh.loadtest.openai_load --base-url URL --model NAME --rate 4 --num-requests 200

Library: `result = await run_load(LoadConfig(...))`, `summarize(records)`, `write_results(result, path)`.
Writes loadtest/results/openai_load.json (config, summary, per-request records) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from kvmesh.loadtest.load_report import format_summary, summarize, write_results
from kvmesh.loadtest.load_types import LengthDist, LoadConfig, LoadResult, RequestRecord
from kvmesh.loadtest.workloads import WORDS, text_of_tokens

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "openai_load.json"
# Measured with SmolLM2's BPE: every word of WORDS is one token (1,000 random words -> 1,000 tokens).
# The usual ~1.3 tokens/word holds for running English text, not for this list of common words.
TOKENS_PER_WORD = 1.0
# Fresh random words opening every prompt (after the system prompt): requests never share a KV prefix
# beyond the system prompt, not even across runs with the same seed.
SALT_WORDS = 4
MAX_ERROR_CHARS = 300


class PreparedRequest(NamedTuple):
    index: int  # negative for warm-up requests
    body: dict[str, Any]
    prompt_tokens: int
    max_tokens: int


def build_requests(config: LoadConfig, rng: random.Random, tokenizer: Any = None) -> list[PreparedRequest]:
    """`config.warmup` warm-up requests (negative indices) then `config.num_requests` measured ones."""
    salt_rng = random.Random()  # seeded from os.urandom: salts differ between runs even with one seed
    n_system = config.system_prompt_tokens
    system = _random_text(n_system, rng, tokenizer, []) if n_system else ""
    requests = []
    for index in range(-config.warmup, config.num_requests):
        n_prompt, max_tokens = config.prompt_tokens.sample(rng), config.output_tokens.sample(rng)
        user = _random_text(n_prompt, rng, tokenizer, [salt_rng.choice(WORDS) for _ in range(SALT_WORDS)])
        body: dict[str, Any] = {
            "model": config.model,
            "max_tokens": max_tokens,
            "temperature": config.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if config.endpoint == "chat":
            system_message = [{"role": "system", "content": system}] if system else []
            body["messages"] = [*system_message, {"role": "user", "content": user}]
        else:
            body["prompt"] = f"{system}\n\n{user}" if system else user
        if config.ignore_eos:
            body["ignore_eos"] = True
        requests.append(PreparedRequest(index, body, n_system + n_prompt, max_tokens))
    return requests


def _random_text(num_tokens: int, rng: random.Random, tokenizer: Any, salt: list[str]) -> str:
    if tokenizer is not None:
        prefix = " ".join(salt) + " " if salt else ""
        return tokenizer.decode(text_of_tokens(tokenizer, num_tokens, rng, prefix))
    num_words = max(1, round(num_tokens / TOKENS_PER_WORD))
    salt = salt[:num_words]
    return " ".join(salt + [rng.choice(WORDS) for _ in range(num_words - len(salt))])


@dataclass(slots=True)
class _Progress:
    total: int
    done: int = 0
    errors: int = 0
    in_flight: int = 0
    tokens: int = 0  # text chunks while streaming, corrected to usage counts when a request ends

    def line(self, elapsed: float) -> str:
        return (
            f"{self.done}/{self.total} done, {self.errors} errors, {self.in_flight} in flight, "
            f"{self.tokens / max(elapsed, 1e-9):.1f} output tok/s"
        )


@dataclass(slots=True)
class _Runner:
    """Sends prepared requests to one server and times them; a failure becomes a record, never a raise."""

    client: httpx.AsyncClient
    url: str
    chat: bool
    progress: _Progress
    t0: float = 0.0

    async def send(self, request: PreparedRequest) -> RequestRecord:
        rec = RequestRecord(request.index, request.prompt_tokens, request.max_tokens)
        begin = time.perf_counter()
        self.progress.in_flight += 1
        chunks, last, done = 0, 0.0, False
        try:
            async with self.client.stream("POST", self.url, json=request.body) as response:
                rec.status = response.status_code
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    raise _HTTPError(f"HTTP {response.status_code}: {text[:MAX_ERROR_CHARS]}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, `event:` lines, `:` keep-alive comments
                    now = time.perf_counter()
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True  # keep reading to the end of the body: the connection stays reusable
                        continue
                    event = json.loads(data)
                    if event.get("error"):
                        raise _HTTPError(f"error event in stream: {str(event['error'])[:MAX_ERROR_CHARS]}")
                    if usage := event.get("usage"):
                        rec.output_tokens = usage.get("completion_tokens") or 0
                        rec.server_prompt_tokens = usage.get("prompt_tokens")
                    if _carries_text(event, self.chat):
                        if chunks == 0:
                            rec.ttft = now - begin
                        else:
                            rec.itl.append(now - last)
                        chunks, last = chunks + 1, now
                        self.progress.tokens += 1
            if not done:
                rec.error = "stream ended without data: [DONE]"
            elif chunks == 0:
                rec.error = "stream carried no text"
        except _HTTPError as e:
            rec.error = str(e)
        except Exception as e:  # any failure is one failed request, never a failed run
            rec.error = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS] if str(e) else type(e).__name__
        end = time.perf_counter()
        rec.start, rec.end, rec.e2e = begin - self.t0, end - self.t0, end - begin
        rec.output_tokens = rec.output_tokens or chunks
        if rec.error is None and rec.ttft is not None and rec.output_tokens > 1:
            rec.tpot = (rec.e2e - rec.ttft) / (rec.output_tokens - 1)
        self.progress.in_flight -= 1
        self.progress.done += 1
        self.progress.errors += rec.error is not None
        self.progress.tokens += (rec.output_tokens if rec.error is None else 0) - chunks
        return rec

    async def closed_loop(
        self, requests: list[PreparedRequest], clients: int, deadline: float
    ) -> list[RequestRecord]:
        pending = iter(requests)  # shared: each client takes the next request when its previous one ends
        records: list[RequestRecord] = []

        async def client() -> None:
            for request in pending:
                if time.perf_counter() >= deadline:
                    return
                records.append(await self.send(request))

        await asyncio.gather(*(client() for _ in range(clients)))
        return records

    async def open_loop(
        self, requests: list[PreparedRequest], rate: float, deadline: float, rng: random.Random
    ) -> list[RequestRecord]:
        tasks = []
        arrival = 0.0  # the first request goes at once, then exponential gaps: a Poisson process
        for request in requests:
            delay = self.t0 + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(self.send(request)))
            arrival += rng.expovariate(rate)
        return list(await asyncio.gather(*tasks))


class _HTTPError(Exception):
    pass


def _carries_text(event: dict[str, Any], chat: bool) -> bool:
    choices = event.get("choices") or []
    if not choices:
        return False  # the usage chunk
    if chat:
        delta = choices[0].get("delta") or {}
        return any(delta.get(key) for key in ("content", "reasoning_content", "reasoning"))
    return bool(choices[0].get("text"))


@contextlib.asynccontextmanager
async def open_runner(config: LoadConfig, progress: _Progress | None = None) -> AsyncIterator[_Runner]:
    """One keep-alive HTTP client to `config.base_url`: `(await runner.send(request))` times one prepared
    request. run_load drives it; benchmarks that interleave servers request by request use it directly."""
    path = "chat/completions" if config.endpoint == "chat" else "completions"
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = httpx.Timeout(config.timeout, pool=None)
    # Open loop means no client-side cap on connections. trust_env=False: no proxy between us and the server.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits, trust_env=False) as client:
        url = f"{config.base_url.rstrip('/')}/{path}"
        yield _Runner(client, url, config.endpoint == "chat", progress or _Progress(total=0))


async def run_load(config: LoadConfig) -> LoadResult:
    """Warm up, then send `config.num_requests` requests (or until `max_seconds`) and measure them."""
    rng = random.Random(config.seed)
    tokenizer = None
    if config.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    requests = build_requests(config, rng, tokenizer)
    warmups, measured = requests[: config.warmup], requests[config.warmup :]
    progress = _Progress(total=len(measured))
    async with open_runner(config, progress) as runner:
        warmup_errors = [r.error for r in [await runner.send(w) for w in warmups] if r.error]
        progress.done = progress.errors = progress.tokens = 0
        started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        runner.t0 = time.perf_counter()
        deadline = runner.t0 + (config.max_seconds if config.max_seconds is not None else math.inf)
        reporter = asyncio.create_task(_report_progress(progress, runner.t0)) if config.progress else None
        try:
            if config.rate is not None:
                records = await runner.open_loop(measured, config.rate, deadline, rng)
            else:
                records = await runner.closed_loop(measured, config.concurrency or 1, deadline)
        finally:
            if reporter is not None:
                reporter.cancel()
                if sys.stderr.isatty():
                    print(file=sys.stderr)  # end the \r-rewritten progress line
    records.sort(key=lambda r: r.index)
    return LoadResult(config, records, summarize(records), started_at, warmup_errors)


async def _report_progress(progress: _Progress, t0: float) -> None:
    tty = sys.stderr.isatty()
    while True:
        await asyncio.sleep(1.0 if tty else 5.0)
        line = progress.line(time.perf_counter() - t0)
        print(f"\r{line}" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> tuple[LoadConfig, Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"), help="e.g. http://HOST:8000/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop with N clients (the default, N=1)")
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals, requests/s")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--max-seconds", type=float, help="send no new request after this many seconds")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests first")
    for kind, default in (("prompt", 256), ("output", 128)):
        p.add_argument(f"--{kind}-tokens", type=int, default=default)
        p.add_argument(f"--{kind}-dist", choices=("fixed", "uniform", "normal"), default="fixed")
        p.add_argument(f"--{kind}-spread", type=float, default=0.0, help="uniform: ± tokens; normal: std dev")
    p.add_argument("--system-prompt-tokens", type=int, default=0, help="shared by every request")
    p.add_argument("--tokenizer", help="HF tokenizer folder for exact prompt lengths")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--timeout", type=float, default=300.0, help="per request: connect, and between bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    if not a.base_url:
        p.error("--base-url (or $OPENAI_BASE_URL) is required")
    try:
        config = LoadConfig(
            base_url=a.base_url,
            model=a.model,
            endpoint=a.endpoint,
            api_key=a.api_key,
            concurrency=a.concurrency,
            rate=a.rate,
            num_requests=a.num_requests,
            max_seconds=a.max_seconds,
            warmup=a.warmup,
            prompt_tokens=LengthDist(a.prompt_tokens, a.prompt_dist, a.prompt_spread),
            output_tokens=LengthDist(a.output_tokens, a.output_dist, a.output_spread),
            system_prompt_tokens=a.system_prompt_tokens,
            tokenizer=a.tokenizer,
            temperature=a.temperature,
            ignore_eos=a.ignore_eos,
            timeout=a.timeout,
            seed=a.seed,
            label=a.label,
            progress=a.progress,
        )
    except ValueError as e:
        p.error(str(e))
    return config, a.out


def main(argv: list[str] | None = None) -> int:
    config, out = parse_args(argv)
    result = asyncio.run(run_load(config))
    png = write_results(result, out)
    print(format_summary(result))
    print(f"wrote {out} and {png}")
    return 0 if result.summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
