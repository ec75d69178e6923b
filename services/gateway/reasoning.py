"""Reasoning parsers: a chat completion's think section -> `reasoning_content`, the rest -> `content`,
chosen by `--reasoning-parser` (vLLM's names; default: none, the text stays whole).

- `deepseek_r1`: from the start of the output to `</think>`; a leading `<think>` is dropped (R1's
  template puts it in the prompt, so the model may not write it); no `</think>` at all: everything is
  reasoning (the output was cut short while thinking).
- `qwen3`: only when the output begins with `<think>` (leading whitespace aside), up to `</think>`;
  otherwise everything is content (`enable_thinking: false`); an unterminated section is reasoning.

Whole and streamed answers go through the same incremental splitter (`ThinkSplitter`), so a stream's
pieces always join to the whole answer's two fields. A tag split across chunks is held back until it is
known to be one (at most the tag's length minus one characters).
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

from kvmesh.services.gateway.params import OutputLogprob, Usage
from kvmesh.services.gateway.responses import ChatShaper, _dumps, chat_logprobs

THINK_START = "<think>"
THINK_END = "</think>"


class Split(NamedTuple):
    reasoning: str
    content: str


class ThinkSplitter:
    """Feed a completion's text piece by piece; each `feed` returns what is known to be reasoning and
    what content so far; `flush` returns what was held back once the text has ended."""

    def __init__(self, implicit_start: bool) -> None:
        # implicit_start: the output is reasoning from its first character (deepseek_r1)
        self._implicit = implicit_start
        self._state = "start"  # start -> reasoning -> content (or start -> content)
        self._held = ""  # text not yet known to be reasoning or content (a tag's possible prefix)
        self.thought = False  # a think section began (so the answer has reasoning_content)

    def feed(self, text: str) -> Split:
        buf = self._held + text
        self._held = ""
        reasoning: list[str] = []
        content: list[str] = []
        if self._state == "start":
            stripped = buf.lstrip()
            if stripped.startswith(THINK_START):
                buf = stripped[len(THINK_START) :]
                self._state = "reasoning"
                self.thought = True
            elif not stripped or THINK_START.startswith(stripped):
                self._held = buf  # could still become `<think>`
                return Split("", "")
            else:
                self._state = "reasoning" if self._implicit else "content"
                self.thought = self._implicit
        if self._state == "reasoning":
            end = buf.find(THINK_END)
            if end < 0:
                keep = _partial_suffix(buf, THINK_END)
                reasoning.append(buf[: len(buf) - keep])
                self._held = buf[len(buf) - keep :]
                return Split("".join(reasoning), "")
            reasoning.append(buf[:end])
            buf = buf[end + len(THINK_END) :]
            self._state = "content"
        content.append(buf)
        return Split("".join(reasoning), "".join(content))

    def flush(self) -> Split:
        """The held-back text at the end of the output: no tag came after all."""
        held, self._held = self._held, ""
        if self._state == "start" and self._implicit and held:
            self._state, self.thought = "reasoning", True
        if self._state == "reasoning":
            return Split(held, "")
        return Split("", held)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    name: ClassVar[str]
    implicit_start: ClassVar[bool]

    def splitter(self) -> ThinkSplitter:
        return ThinkSplitter(self.implicit_start)

    def split(self, text: str) -> tuple[str | None, str | None]:
        """A whole completion -> (reasoning_content, content). reasoning None: no think section;
        content None: the output ended inside the think section or right after it."""
        splitter = self.splitter()
        first, rest = splitter.feed(text), splitter.flush()
        reasoning, content = first.reasoning + rest.reasoning, first.content + rest.content
        if not splitter.thought:
            return None, content
        return reasoning, content or None


class DeepSeekR1Parser(ReasoningParser):
    name = "deepseek_r1"
    implicit_start = True


class Qwen3Parser(ReasoningParser):
    name = "qwen3"
    implicit_start = False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (DeepSeekR1Parser, Qwen3Parser)}


class ReasoningChatShaper(ChatShaper):
    """A chat answer split by a reasoning parser: the think section as `reasoning_content` (streamed as
    `{"delta": {"reasoning_content": ...}}` pieces), the rest handed to `inner` (the plain or the
    tool-calling shaper) as the answer's text."""

    def __init__(self, inner: ChatShaper, parser: ReasoningParser) -> None:
        super().__init__(inner.request_id, inner.model, inner.created, inner.texts, inner.include_usage)
        self.inner = inner
        self.parser = parser
        self._splitter = parser.splitter()
        self._held_logprobs: list[OutputLogprob] | None = None

    def opening(self) -> bytes:
        return self.inner.opening()

    def delta(self, text: str, logprobs: list[OutputLogprob] | None) -> bytes:
        if self._held_logprobs:  # of text held back before: they go with the next piece sent
            logprobs, self._held_logprobs = self._held_logprobs + (logprobs or []), None
        split = self._splitter.feed(text)
        if logprobs and not (split.reasoning or split.content):
            self._held_logprobs = logprobs
        return self._pieces(split, logprobs)

    def _pieces(self, split: Split, logprobs: list[OutputLogprob] | None) -> bytes:
        out = b""
        if split.reasoning:
            out += self._reasoning_chunk(split.reasoning, None if split.content else logprobs)
        if split.content:
            out += self.inner.delta(split.content, logprobs)
        return out

    def _reasoning_chunk(self, text: str, logprobs: list[OutputLogprob] | None) -> bytes:
        lp = "null" if not logprobs or self.texts is None else _dumps(chat_logprobs(logprobs, self.texts))
        delta = '{"index":0,"delta":{"reasoning_content":' + _dumps(text) + "}"
        return self._chunk(delta + ',"logprobs":' + lp + ',"finish_reason":null}')

    def finish(self, reason: str) -> bytes:
        held, self._held_logprobs = self._held_logprobs, None
        return self._pieces(self._splitter.flush(), held) + self.inner.finish(reason)

    def usage(self, usage: Usage) -> bytes:
        return self.inner.usage(usage)

    def response(
        self, text: str, logprobs: list[OutputLogprob] | None, reason: str, usage: Usage
    ) -> dict[str, Any]:
        reasoning, content = self.parser.split(text)
        body = self.inner.response(content or "", logprobs, reason, usage)
        message = body["choices"][0]["message"]
        if content is None and not message.get("tool_calls"):
            message["content"] = None
        message["reasoning_content"] = reasoning
        return body


def get_reasoning_parser(name: str) -> ReasoningParser:
    try:
        return REASONING_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; one of {sorted(REASONING_PARSERS)}") from None
