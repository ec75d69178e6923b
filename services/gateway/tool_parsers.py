"""Tool-call parsers: a model's raw completion -> (content, tool calls), chosen by `--tool-call-parser`.

Each parser is a small class registered by name (vLLM's names): `extract()` parses a whole
completion, `start_of_calls()` tells the streaming side where the calls begin so that the text before
them streams as content and the rest is held until the end. A call that does not parse (bad JSON, no
name, arguments that are not an object) is never dropped and never an error: its raw text stays in
the content.

| parser | format |
|---|---|
| `hermes` | `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text around them |
| `llama3_json` | the whole output is `{"name": ..., "parameters": {...}}` (or `arguments`), maybe after |
| | `<|python_tag|>`; several joined by `;` |
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple


class ParsedCall(NamedTuple):
    name: str
    arguments: str  # JSON text of an object


class ParsedOutput(NamedTuple):
    content: str | None  # text outside the calls (None when there is none)
    calls: list[ParsedCall]


def call_from_json(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall | None:
    """{"name": str, "arguments" | "parameters": object (or its JSON text)} -> a call; else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _content(parts: list[str]) -> str | None:
    """The text around the calls, without the blank lines that separated them (None: nothing)."""
    return "".join(parts).strip() or None


class ToolParser(ABC):
    name: ClassVar[str]
    # strings that may begin the calls: the streaming side holds back a suffix that could start one
    markers: ClassVar[tuple[str, ...]]

    @abstractmethod
    def extract(self, text: str) -> ParsedOutput:
        """The whole completion's content and calls."""

    def start_of_calls(self, text: str) -> int | None:
        """Where the calls begin in the completion so far (None: not yet seen)."""
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def held_back(self, text: str) -> int:
        """How many trailing characters of `text` could be the start of a marker (not safe to stream)."""
        longest = 0
        for marker in self.markers:
            for n in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:n]):
                    longest = max(longest, n)
                    break
        return longest


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> ParsedOutput:
        calls: list[ParsedCall] = []
        content: list[str] = []
        pos = 0
        for m in self._CALL.finditer(text):
            content.append(text[pos : m.start()])
            pos = m.end()
            try:
                call = call_from_json(json.loads(m.group(1).strip()))
            except ValueError:
                call = None
            if call is None:
                content.append(m.group(0))  # malformed: stays as text
            else:
                calls.append(call)
        content.append(text[pos:])
        return ParsedOutput(_content(content), calls)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")
    _PYTHON_TAG = "<|python_tag|>"

    def start_of_calls(self, text: str) -> int | None:
        # only a completion that *begins* with a call is one (a `{` in prose is prose)
        stripped = text.lstrip()
        if stripped.startswith(self._PYTHON_TAG) or stripped.startswith("{"):
            return len(text) - len(stripped)
        return None

    def held_back(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or self._PYTHON_TAG.startswith(stripped):
            return len(text)  # nothing decided yet
        return 0

    def extract(self, text: str) -> ParsedOutput:
        body = text.strip()
        if body.startswith(self._PYTHON_TAG):
            body = body[len(self._PYTHON_TAG) :].strip()
        if not body.startswith("{"):
            return ParsedOutput(_content([text]), [])
        calls: list[ParsedCall] = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                return ParsedOutput(_content([text]), [])
            call = call_from_json(obj, ("parameters", "arguments"))
            if call is None:
                return ParsedOutput(_content([text]), [])
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return ParsedOutput(None, calls)


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser)}


def get_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; one of {sorted(PARSERS)}") from None
