"""The token-stream side of a request without a network: detokenization, stop strings, logprobs,
usage, timeouts and aborts. Stream messages go straight into the queue the bus would feed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import msgspec
import pytest

from kvmesh.libs.bus import encode
from kvmesh.schemas.messages import (
    AbortRequest,
    ErrorReply,
    Finished,
    GenerateRequest,
    RouteRequest,
    SamplingOptions,
    Subjects,
    TokenChunk,
    TokenLogprobs,
)
from kvmesh.services.gateway import stream
from kvmesh.services.gateway.dispatch import Attempt, Dispatcher, Submission
from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.generation import Generator, RunningRequest
from kvmesh.services.gateway.params import GenerationParams, Limits, Timeouts


class RecordingBus:
    def __init__(self) -> None:
        self.published: list[tuple[str, object]] = []

    async def publish(self, subject, msg) -> None:
        self.published.append((subject, msg))


SUBMISSION = Submission(
    RouteRequest(request_id="chatcmpl-1", num_tokens=5, max_tokens=100),
    GenerateRequest(
        request_id="chatcmpl-1",
        token_ids=[1, 2, 3, 4, 5],
        sampling=SamplingOptions(max_tokens=100),
        stream_subject=Subjects.stream("chatcmpl-1"),
    ),
)


def running(
    tokenizer, bus, timeouts: Timeouts | None = None, max_migrations: int = 0, **params
) -> tuple[RunningRequest, asyncio.Queue]:
    """A request worker w1 has accepted; no other worker exists (moves fail unless max_migrations=0)."""
    timeouts = timeouts or Timeouts()
    queue: asyncio.Queue = asyncio.Queue()
    req = RunningRequest(
        Dispatcher(bus, timeouts),
        tokenizer,
        GenerationParams(max_tokens=None, **params),
        timeouts,
        SUBMISSION,
        Attempt("w1", None, queue),
        arrival=asyncio.get_running_loop().time(),
        max_migrations=max_migrations,
    )
    return req, queue


def feed(queue: asyncio.Queue, *msgs) -> None:
    for msg in msgs:
        queue.put_nowait(SimpleNamespace(data=encode(msg)))


def chunks_of(tokenizer, text: str, sizes: list[int]) -> list[TokenChunk]:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    out, i = [], 0
    for n in [*sizes, len(ids)]:
        if i < len(ids):
            out.append(TokenChunk(token_ids=ids[i : i + n], first_index=i))
        i += n
    return out


async def test_text_deltas_never_empty_and_end_with_usage(tokenizer):
    bus = RecordingBus()
    req, queue = running(tokenizer, bus)
    text = "Crabs 🦀 live in the sea."
    feed(
        queue,
        *chunks_of(tokenizer, text, [1, 1, 1, 1]),
        Finished(finish_reason="stop", num_prompt_tokens=5, num_output_tokens=9, num_cached_tokens=2),
    )
    outs = [o async for o in req.outputs()]
    assert all(o.text for o in outs[:-1]), "a token that completes no character sends nothing"
    assert "".join(o.text for o in outs) == text
    assert outs[-1].finish_reason == "stop" and outs[-1].usage == (5, 9, 2)
    await req.close()
    assert bus.published == [], "a finished request is not aborted"


async def test_stop_string_across_chunks_cuts_text_and_aborts_the_worker(tokenizer):
    bus = RecordingBus()
    req, queue = running(tokenizer, bus, stop=("STOP here",))
    chunks = chunks_of(tokenizer, "Hello world, STOP here and more", [4, 1, 2])
    pieces = [tokenizer.decode(c.token_ids) for c in chunks]
    assert pieces[:3] == ["Hello world, ST", "OP", " here and"], "the stop string spans three chunks"
    feed(
        queue,
        *chunks,
        Finished(finish_reason="abort", num_prompt_tokens=5, num_output_tokens=9, num_cached_tokens=3),
    )
    text, lps, reason, usage = await req.collect()
    assert (text, lps, reason) == ("Hello world, ", None, "stop")
    assert usage == (5, 6, 3), "bill the tokens used up to the stop, the cached count from the worker"
    assert bus.published == [(Subjects.worker("w1", "abort"), AbortRequest(request_id="chatcmpl-1"))]
    await req.close()
    assert len(bus.published) == 1


async def test_stop_without_final_record_still_finishes(tokenizer, monkeypatch):
    monkeypatch.setattr(stream, "ABORT_GRACE_S", 0.05)
    req, queue = running(tokenizer, RecordingBus(), stop=("b",), include_stop_str_in_output=True)
    feed(queue, *chunks_of(tokenizer, "a b c", [1]))
    assert await req.collect() == ("a b", None, "stop", (5, 2, 0))


async def test_min_tokens_delays_stop_strings(tokenizer):
    req, queue = running(tokenizer, RecordingBus(), stop=("x",), min_tokens=2)
    feed(queue, *chunks_of(tokenizer, "x x x", [1]))  # ["x", " x", " x"]
    text, _, reason, _ = await req.collect()
    assert (text, reason) == ("x ", "stop")


async def test_logprobs_ride_with_their_text(tokenizer):
    req, queue = running(tokenizer, RecordingBus(), logprobs=1)
    ids = tokenizer.encode("🦀 ok", add_special_tokens=False).ids

    def lp(t: int) -> TokenLogprobs:
        return TokenLogprobs(logprob=-1.0, top_ids=[t], top_logprobs=[-1.0])

    feed(queue, *[TokenChunk(token_ids=[t], first_index=i, logprobs=[lp(t)]) for i, t in enumerate(ids)])
    feed(
        queue,
        Finished(
            finish_reason="length", num_prompt_tokens=5, num_output_tokens=len(ids), num_cached_tokens=0
        ),
    )
    outs = [o async for o in req.outputs()]
    assert outs[0].text == "🦀" and [x.token_id for x in outs[0].logprobs] == ids[:-1]
    assert [x.token_id for o in outs for x in (o.logprobs or [])] == ids
    assert [x.text_offset for o in outs for x in o.logprobs or []][-1] == len("🦀")


async def test_worker_error_mid_stream(tokenizer):
    req, queue = running(tokenizer, RecordingBus())
    feed(queue, TokenChunk(token_ids=[42]), ErrorReply(code="invalid_request", message="bad id"))
    with pytest.raises(GatewayError) as info:
        await req.collect()
    assert info.value.status == 400 and "bad id" in info.value.message
    # an engine failure is the worker losing the request: with no move left, a 503 that says so
    req, queue = running(tokenizer, RecordingBus())
    feed(queue, TokenChunk(token_ids=[42]), ErrorReply(code="internal", message="engine died"))
    with pytest.raises(GatewayError) as info:
        await req.collect()
    assert info.value.status == 503 and "engine died" in info.value.message


async def test_silent_worker_times_out_and_is_aborted(tokenizer):
    bus = RecordingBus()
    req, queue = running(tokenizer, bus, timeouts=Timeouts(token=0.05, request=10))
    feed(queue, TokenChunk(token_ids=[42]))
    with pytest.raises(GatewayError) as info:
        await req.collect()
    assert info.value.status == 504 and "no token" in info.value.message
    assert info.value.code == "token_timeout"
    assert bus.published == [(Subjects.worker("w1", "abort"), AbortRequest(request_id="chatcmpl-1"))]
    req, queue = running(tokenizer, RecordingBus(), timeouts=Timeouts(token=10, request=0.05))
    with pytest.raises(GatewayError, match="time limit"):
        await req.collect()
    req, queue = running(tokenizer, RecordingBus(), timeouts=Timeouts(first_token=0.05))
    with pytest.raises(GatewayError) as info:
        await req.collect()
    assert (info.value.status, info.value.code) == (504, "first_token_timeout")


async def test_closing_early_aborts_once(tokenizer):
    bus = RecordingBus()
    req, _ = running(tokenizer, bus)
    await req.close()
    await req.close()
    assert len(bus.published) == 1


@pytest.mark.parametrize(
    ("num_prompt", "max_tokens", "expect"),
    [(100, None, 924), (100, 924, 924), (100, 925, 400), (1024, None, 400), (10, 5, 5)],
)
def test_context_length(num_prompt, max_tokens, expect):
    gen = Generator(None, None, max_model_len=1024, timeouts=Timeouts())
    params = GenerationParams(max_tokens=max_tokens, prompt_param="messages")
    if expect == 400:
        with pytest.raises(GatewayError) as info:
            gen._max_tokens(num_prompt, params)
        assert info.value.status == 400 and info.value.code == "context_length_exceeded"
        assert info.value.param == "messages" and "1024" in info.value.message
    else:
        assert gen._max_tokens(num_prompt, params) == expect
    with pytest.raises(GatewayError, match="min_tokens"):
        gen._max_tokens(10, GenerationParams(max_tokens=None, min_tokens=2000))


async def test_a_lost_chunk_without_moves_left_fails_the_request_and_aborts_the_worker(tokenizer):
    bus = RecordingBus()
    req, queue = running(tokenizer, bus)
    feed(queue, TokenChunk(token_ids=[42], first_index=0), TokenChunk(token_ids=[43], first_index=2))
    with pytest.raises(GatewayError, match="skipped from token 1 to 2") as info:
        await req.collect()
    assert (info.value.status, info.value.code) == (503, "worker_lost")
    assert bus.published == [(Subjects.worker("w1", "abort"), AbortRequest(request_id="chatcmpl-1"))]


def test_a_continuation_carries_prompt_plus_output_and_the_budget_left():
    route, gen = SUBMISSION
    gen = msgspec.structs.replace(
        gen, sampling=SamplingOptions(max_tokens=10, min_tokens=4, seed=7, temperature=0.8)
    )
    route = msgspec.structs.replace(route, max_tokens=10, exclude=["w0"], block_hashes=[11])
    nxt = stream.resume(Submission(route, gen), [40, 41, 42], ["w1"], 1)
    assert nxt.generate.token_ids == [1, 2, 3, 4, 5, 40, 41, 42]
    s = nxt.generate.sampling
    assert (s.max_tokens, s.min_tokens, s.resumed_tokens, s.seed, s.temperature) == (7, 1, 3, 7, 0.8)
    assert nxt.generate.stream_subject == Subjects.stream("chatcmpl-1") + ".m1"
    assert nxt.generate.request_id == "chatcmpl-1", "one request id end to end"
    assert nxt.generate.migrated and not gen.migrated, "admitted already: not refused as overloaded"
    assert (nxt.route.num_tokens, nxt.route.max_tokens) == (8, 7)
    assert nxt.route.exclude == ["w0", "w1"] and nxt.route.block_hashes == [11]
    assert stream.resume(Submission(route, gen), list(range(10)), ["w1"], 1) is None, "nothing left"


def test_limits_cap_max_tokens():
    gen = Generator(None, None, max_model_len=1024, timeouts=Timeouts(), limits=Limits(max_tokens_cap=50))
    assert gen._max_tokens(100, GenerationParams(max_tokens=None)) == 50, "the cap is the default"
    assert gen._max_tokens(1000, GenerationParams(max_tokens=None)) == 24
