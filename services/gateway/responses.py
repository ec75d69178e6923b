"""OpenAI response objects: whole completions, SSE chunks, logprobs, usage, errors.

Streaming chunks are built from a JSON prefix rendered once per request: a text delta costs one
`json.dumps` of the text. The chunk shapes are OpenAI's (`chat.completion.chunk`, `text_completion`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from tokenizers import Tokenizer, decoders

from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.params import GenerationOutput, OutputLogprob, Usage

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM clamps the same way


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def sse_event(payload: str) -> bytes:
    return b"data: " + payload.encode() + b"\n\n"


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character: that character -> the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    alphabet = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            alphabet[chr(256 + shifted)] = b
            shifted += 1
    return alphabet


class TokenTexts:
    """Each token's own text and bytes, for logprobs (cached: bounded by the vocabulary)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._alphabet = _byte_level_alphabet() if isinstance(tokenizer.decoder, decoders.ByteLevel) else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            raw = self._raw_bytes(token_id)
            hit = self._cache[token_id] = (text, list(raw if raw is not None else text.encode()))
        return hit

    def _raw_bytes(self, token_id: int) -> bytes | None:
        """The token's exact bytes (a byte-level token may hold part of a character)."""
        piece = self._tokenizer.id_to_token(token_id)
        if self._alphabet is None or piece is None or not all(c in self._alphabet for c in piece):
            return None
        return bytes(self._alphabet[c] for c in piece)


def chat_logprobs(lps: list[OutputLogprob], texts: TokenTexts) -> dict[str, Any]:
    content = []
    for lp in lps:
        token, raw = texts.get(lp.token_id)
        top = []
        for tid, value in zip(lp.lp.top_ids, lp.lp.top_logprobs, strict=False):
            top_token, top_raw = texts.get(tid)
            top.append({"token": top_token, "logprob": max(value, MIN_LOGPROB), "bytes": top_raw})
        content.append(
            {"token": token, "logprob": max(lp.lp.logprob, MIN_LOGPROB), "bytes": raw, "top_logprobs": top}
        )
    return {"content": content}


def completion_logprobs(lps: list[OutputLogprob], texts: TokenTexts) -> dict[str, Any]:
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        tokens.append(texts.get(lp.token_id)[0])
        values.append(max(lp.lp.logprob, MIN_LOGPROB))
        top: dict[str, float] = {}
        for tid, value in zip(lp.lp.top_ids, lp.lp.top_logprobs, strict=False):
            top.setdefault(texts.get(tid)[0], max(value, MIN_LOGPROB))
        tops.append(top)
        offsets.append(lp.text_offset)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


class StreamShaper:
    """Per-request response builder; subclasses fill in the choice shapes (and, for another event
    format than chat's and completions', `done` and `error_event`)."""

    object_name = ""
    chunk_object_name = ""

    def __init__(
        self, request_id: str, model: str, created: int, texts: TokenTexts | None, include_usage: bool = False
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.created = created
        self.texts = texts  # None: no logprobs were asked for
        self.include_usage = include_usage
        head = {"id": request_id, "object": self.chunk_object_name, "created": created, "model": model}
        self._head = _dumps(head)[:-1] + ',"choices":['
        self._tail = ',"usage":null}' if include_usage else "}"

    def _chunk(self, choice: str) -> bytes:
        return sse_event(self._head + choice + "]" + self._tail)

    def opening(self) -> bytes | None:
        return None

    def delta(self, text: str, logprobs: list[OutputLogprob] | None) -> bytes:
        raise NotImplementedError

    def finish(self, reason: str) -> bytes:
        raise NotImplementedError

    def usage(self, usage: Usage) -> bytes:
        return sse_event(self._head + '],"usage":' + _dumps(usage_dict(usage)) + "}")

    def response(
        self, text: str, logprobs: list[OutputLogprob] | None, reason: str, usage: Usage
    ) -> dict[str, Any]:
        """The whole answer (not streamed)."""
        raise NotImplementedError

    def error_event(self, exc: GatewayError) -> bytes:
        """A failure after the 200 went out."""
        return sse_event(_dumps(exc.body()))

    def done(self) -> bytes:
        """The stream's last event."""
        return DONE

    def _body(self, choice: dict[str, Any], usage: Usage) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_dict(usage),
        }


class ChatShaper(StreamShaper):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def opening(self) -> bytes:
        return self._chunk(
            '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}'
        )

    def delta(self, text: str, logprobs: list[OutputLogprob] | None) -> bytes:
        lp = "null" if not logprobs or self.texts is None else _dumps(chat_logprobs(logprobs, self.texts))
        return self._chunk(
            '{"index":0,"delta":{"content":' + _dumps(text) + '},"logprobs":' + lp + ',"finish_reason":null}'
        )

    def finish(self, reason: str) -> bytes:
        return self._chunk('{"index":0,"delta":{},"logprobs":null,"finish_reason":' + _dumps(reason) + "}")

    def response(
        self, text: str, logprobs: list[OutputLogprob] | None, reason: str, usage: Usage
    ) -> dict[str, Any]:
        lp = None if logprobs is None or self.texts is None else chat_logprobs(logprobs, self.texts)
        message = {"role": "assistant", "content": text}
        return self._body({"index": 0, "message": message, "logprobs": lp, "finish_reason": reason}, usage)


class CompletionShaper(StreamShaper):
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    echo = ""  # `echo`: the prompt's text, sent before the completion

    def opening(self) -> bytes | None:
        return self.delta(self.echo, None) if self.echo else None

    def delta(self, text: str, logprobs: list[OutputLogprob] | None) -> bytes:
        lp = (
            "null"
            if not logprobs or self.texts is None
            else _dumps(completion_logprobs(logprobs, self.texts))
        )
        return self._chunk(
            '{"index":0,"text":' + _dumps(text) + ',"logprobs":' + lp + ',"finish_reason":null}'
        )

    def finish(self, reason: str) -> bytes:
        return self._chunk('{"index":0,"text":"","logprobs":null,"finish_reason":' + _dumps(reason) + "}")

    def response(
        self, text: str, logprobs: list[OutputLogprob] | None, reason: str, usage: Usage
    ) -> dict[str, Any]:
        lp = None if logprobs is None or self.texts is None else completion_logprobs(logprobs, self.texts)
        choice = {"index": 0, "text": self.echo + text, "logprobs": lp, "finish_reason": reason}
        return self._body(choice, usage)


async def sse_stream(shaper: StreamShaper, outputs: AsyncIterator[GenerationOutput]) -> AsyncIterator[bytes]:
    """The SSE body: chunks, the finish chunk, the usage chunk if asked, `[DONE]`. A failure after
    the headers went out becomes an `{"error": ...}` event (the status is 200 by then)."""
    opening = shaper.opening()
    if opening is not None:
        yield opening
    try:
        async for out in outputs:
            if out.text or out.logprobs:
                yield shaper.delta(out.text, out.logprobs)
            if out.finish_reason is not None:
                yield shaper.finish(out.finish_reason)
                if shaper.include_usage and out.usage is not None:
                    yield shaper.usage(out.usage)
    except GatewayError as exc:
        log.warning("%s: failed mid-stream: %s", shaper.request_id, exc.message)
        yield shaper.error_event(exc)
    except Exception as exc:
        log.exception("%s: failed mid-stream", shaper.request_id)
        yield shaper.error_event(GatewayError.internal(f"internal error: {type(exc).__name__}"))
    if done := shaper.done():
        yield done
