"""Incremental detokenization and stop-string matching, shared by the engine and the gateway.

Streaming text must never emit half of a multi-byte character (one emoji can span several byte-level
tokens) nor any part of a stop string. `IncrementalDetokenizer` decodes token by token through the
tokenizers library's DecodeStream, which buffers incomplete UTF-8; `StopStringMatcher` finds stop
strings that span token boundaries and holds back only the trailing characters that could still
become one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


def backend_tokenizer(tokenizer) -> Tokenizer:
    """The Rust `tokenizers.Tokenizer` behind a transformers fast tokenizer (or itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend")
    return backend


class IncrementalDetokenizer:
    """Turns a growing sequence of output token ids into text deltas."""

    __slots__ = ("_stream", "_tokenizer")

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Text this token completes ("" while a multi-byte character is still partial)."""
        return self._stream.step(self._tokenizer, token_id) or ""

    def extend(self, token_ids: Sequence[int]) -> str:
        return "".join(self.step(t) for t in token_ids)


class StopMatch(NamedTuple):
    emit: str  # text that is safe to send now
    stopped: bool  # a stop string was found (emit ends before it, or includes it if asked)


class StopStringMatcher:
    """Accumulates text and reports the first occurrence of any stop string, even across deltas."""

    __slots__ = ("_emitted", "_holdback", "_include", "_stops", "_text")

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self._stops = [s for s in stops if s]
        self._include = include_stop_str_in_output
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""
        self._emitted = 0  # characters of _text already emitted

    @property
    def text(self) -> str:
        return self._text

    def feed(self, delta: str) -> StopMatch:
        if not self._stops:
            self._text += delta
            self._emitted = len(self._text)
            return StopMatch(delta, False)
        # Only a window that includes the new text can hold a new match.
        window_start = max(0, len(self._text) - self._holdback)
        self._text += delta
        first = -1
        first_stop = ""
        for s in self._stops:
            i = self._text.find(s, window_start)
            if i != -1 and (first == -1 or i < first):
                first, first_stop = i, s
        if first != -1:
            end = first + len(first_stop) if self._include else first
            self._text = self._text[:end]
            emit = self._text[self._emitted :]
            self._emitted = len(self._text)
            return StopMatch(emit, True)
        safe = max(len(self._text) - self._partial_stop_len(), self._emitted)
        emit = self._text[self._emitted : safe]
        self._emitted = safe
        return StopMatch(emit, False)

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        tail = self._text[-self._holdback :] if self._holdback else ""
        for k in range(len(tail), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self._stops):
                return k
        return 0

    def flush(self) -> str:
        """Text held back for a possible stop string, released when the request ends otherwise."""
        emit = self._text[self._emitted :]
        self._emitted = len(self._text)
        return emit
