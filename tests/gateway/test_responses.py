"""Response shaping: OpenAI's chunk and completion objects, logprobs, usage, SSE framing."""

from __future__ import annotations

import json

from kvmesh.schemas.messages import TokenLogprobs
from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.params import GenerationOutput, OutputLogprob, Usage
from kvmesh.services.gateway.responses import (
    ChatShaper,
    CompletionShaper,
    TokenTexts,
    completion_logprobs,
    sse_stream,
)

USAGE = Usage(prompt_tokens=7, completion_tokens=3, cached_tokens=4)


def event(frame: bytes) -> dict:
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    return json.loads(frame[6:])


def test_chat_chunks_are_openai_shaped():
    s = ChatShaper("chatcmpl-1", "m", 123, None, include_usage=True)
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 123, "model": "m"}
    choice = {"index": 0, "logprobs": None, "finish_reason": None}
    assert event(s.opening()) == {
        **head,
        "choices": [{**choice, "delta": {"role": "assistant", "content": ""}}],
        "usage": None,
    }
    assert event(s.delta('say "hi"\n✓', None)) == {
        **head,
        "choices": [{**choice, "delta": {"content": 'say "hi"\n✓'}}],
        "usage": None,
    }
    assert event(s.finish("length")) == {
        **head,
        "choices": [{**choice, "delta": {}, "finish_reason": "length"}],
        "usage": None,
    }
    usage = {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert event(s.usage(USAGE)) == {**head, "choices": [], "usage": usage}
    assert "usage" not in event(ChatShaper("c", "m", 1, None).delta("x", None))
    full = s.response("Paris.", None, "stop", USAGE)
    assert full == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 123,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }


def test_completion_chunks_are_openai_shaped():
    s = CompletionShaper("cmpl-1", "m", 5, None)
    assert s.opening() is None
    assert event(s.delta("abc", None)) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 5,
        "model": "m",
        "choices": [{"index": 0, "text": "abc", "logprobs": None, "finish_reason": None}],
    }
    assert event(s.finish("stop"))["choices"] == [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
    ]
    full = s.response("abc", None, "length", USAGE)
    assert full["object"] == "text_completion" and full["choices"][0]["text"] == "abc"
    assert full["usage"]["total_tokens"] == 10


def test_token_texts_give_exact_bytes_of_partial_characters(tokenizer):
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode("🦀", add_special_tokens=False).ids
    assert len(ids) > 1
    assert b"".join(bytes(texts.get(t)[1]) for t in ids) == "🦀".encode()
    paris = tokenizer.encode(" Paris", add_special_tokens=False).ids
    assert texts.get(paris[0]) == (" Paris", list(b" Paris"))
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert texts.get(im_end)[0] == "<|im_end|>"


def test_logprobs_shapes(tokenizer):
    texts = TokenTexts(tokenizer)
    a, b = tokenizer.encode(" Paris is", add_special_tokens=False).ids
    lps = [
        OutputLogprob(a, 0, TokenLogprobs(logprob=-0.1, top_ids=[a, b], top_logprobs=[-0.1, -2.5])),
        OutputLogprob(b, 6, TokenLogprobs(logprob=float("-inf"), top_ids=[b], top_logprobs=[float("-inf")])),
    ]
    chat = event(ChatShaper("c", "m", 1, texts).delta(" Paris is", lps))["choices"][0]["logprobs"]
    first, second = chat["content"]
    assert first == {
        "token": " Paris",
        "logprob": -0.1,
        "bytes": list(b" Paris"),
        "top_logprobs": [
            {"token": " Paris", "logprob": -0.1, "bytes": list(b" Paris")},
            {"token": " is", "logprob": -2.5, "bytes": list(b" is")},
        ],
    }
    assert second["logprob"] == -9999.0, "-inf is not JSON: clamped"
    assert completion_logprobs(lps, texts) == {
        "tokens": [" Paris", " is"],
        "token_logprobs": [-0.1, -9999.0],
        "top_logprobs": [{" Paris": -0.1, " is": -2.5}, {" is": -9999.0}],
        "text_offset": [0, 6],
    }
    assert (
        ChatShaper("c", "m", 1, texts).response(" Paris is", lps, "stop", USAGE)["choices"][0]["logprobs"]
        == chat
    )


async def outputs(*items):
    for item in items:
        if isinstance(item, Exception):
            raise item
        yield item


async def frames(shaper, *items) -> list[bytes]:
    return [f async for f in sse_stream(shaper, outputs(*items))]


async def test_sse_stream_sequence_with_usage():
    s = ChatShaper("c", "m", 1, None, include_usage=True)
    got = await frames(s, GenerationOutput("Hel"), GenerationOutput("lo", None, "stop", USAGE))
    assert got[-1] == b"data: [DONE]\n\n"
    chunks = [event(f) for f in got[:-1]]
    assert [c["choices"][0]["delta"] if c["choices"] else None for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
        None,
    ]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[4]["usage"]["completion_tokens"] == 3


async def test_sse_stream_error_mid_stream_is_an_error_event_then_done():
    s = CompletionShaper("c", "m", 1, None)
    got = await frames(s, GenerationOutput("a"), GatewayError.timeout("too slow"))
    assert event(got[0])["choices"][0]["text"] == "a"
    assert event(got[1]) == {
        "error": {"message": "too slow", "type": "timeout_error", "param": None, "code": "timeout"}
    }
    assert got[2] == b"data: [DONE]\n\n" and len(got) == 3
    got = await frames(s, RuntimeError("secret internals"))
    assert "secret" not in got[0].decode() and event(got[0])["error"]["type"] == "server_error"
