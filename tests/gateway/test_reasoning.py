"""Reasoning parsers without a mesh: recorded think-style outputs split into reasoning_content and
content, whole and streamed in every chunking (a tag split across chunks included), the chat shaper's
deltas against its whole response (with a tool-call parser behind it too), and the flag."""

from __future__ import annotations

import json

import pytest

from kvmesh.libs import cli
from kvmesh.services.gateway.config import GatewayConfig
from kvmesh.services.gateway.params import ToolPlan, Usage
from kvmesh.services.gateway.reasoning import REASONING_PARSERS, ReasoningChatShaper, get_reasoning_parser
from kvmesh.services.gateway.responses import ChatShaper
from kvmesh.services.gateway.tool_parsers import get_parser
from kvmesh.services.gateway.tools import ToolChatShaper

# (output, deepseek_r1's split, qwen3's split): recorded shapes of R1 / Qwen3 / QwQ answers
CASES = [
    (
        "<think>\nThe user greets me. I greet back.\n</think>\n\nHello! How can I help?",
        ("\nThe user greets me. I greet back.\n", "\n\nHello! How can I help?"),
        ("\nThe user greets me. I greet back.\n", "\n\nHello! How can I help?"),
    ),
    (  # R1's template opens the think section in the prompt: the output starts inside it
        "2 + 2 is 4, since 2 + 2 = 4.\n</think>\n\nThe answer is **4**.",
        ("2 + 2 is 4, since 2 + 2 = 4.\n", "\n\nThe answer is **4**."),
        (None, "2 + 2 is 4, since 2 + 2 = 4.\n</think>\n\nThe answer is **4**."),
    ),
    (  # cut short by max_tokens while thinking: unterminated
        "<think>\nLet me count the letters: s, t, r",
        ("\nLet me count the letters: s, t, r", None),
        ("\nLet me count the letters: s, t, r", None),
    ),
    (  # enable_thinking false (Qwen3): an empty think block, or none at all
        "<think>\n\n</think>\n\nParis.",
        ("\n\n", "\n\nParis."),
        ("\n\n", "\n\nParis."),
    ),
    (  # no think section at all
        "Paris is the capital of France.",
        ("Paris is the capital of France.", None),
        (None, "Paris is the capital of France."),
    ),
    (  # a `<` that is not a tag, and a later <think> that is content
        "a < b </think> so <think> stays",
        ("a < b ", " so <think> stays"),
        (None, "a < b </think> so <think> stays"),
    ),
    ("", (None, ""), (None, "")),
    ("</think>", ("", None), (None, "</think>")),
]
PARSER_CASES = [
    (name, text, split)
    for text, r1, qwen3 in CASES
    for name, split in (("deepseek_r1", r1), ("qwen3", qwen3))
]


@pytest.mark.parametrize(("name", "text", "want"), PARSER_CASES)
def test_whole_output_splits(name, text, want):
    assert get_reasoning_parser(name).split(text) == want


def _streamed(name: str, pieces: list[str]) -> tuple[str, str]:
    splitter = get_reasoning_parser(name).splitter()
    reasoning, content = "", ""
    for piece in [*pieces, None]:
        part = splitter.feed(piece) if piece is not None else splitter.flush()
        reasoning += part.reasoning
        content += part.content
    return reasoning, content


@pytest.mark.parametrize(("name", "text", "want"), PARSER_CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_streamed_pieces_join_to_the_whole_split(name, text, want, size):
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    assert _streamed(name, pieces) == tuple(part or "" for part in want)


def test_a_tag_split_across_chunks_is_held_back_never_sent_as_text():
    splitter = get_reasoning_parser("qwen3").splitter()
    assert splitter.feed("<th") == ("", "")  # could be <think>: nothing decided
    assert splitter.feed("ink>I think") == ("I think", "")
    assert splitter.feed(" so </th") == (" so ", "")  # "</th" held back
    assert splitter.feed("ink>Yes") == ("", "Yes")
    assert splitter.flush() == ("", "")
    splitter = get_reasoning_parser("deepseek_r1").splitter()
    assert splitter.feed("maybe </") == ("maybe ", "")
    assert splitter.feed("b>") == ("</b>", "")  # not the tag after all: reasoning
    assert splitter.feed("done</think") == ("done", "")
    assert splitter.flush() == ("</think", "")  # unterminated: the held text is reasoning


def _assemble(chunks: list[bytes]) -> tuple[str, str, str | None, list]:
    reasoning, content, reason, calls = "", "", None, []
    for raw in chunks:
        for event in raw.decode().split("\n\n"):
            if not event.startswith("data: {"):
                continue
            choice = json.loads(event[6:])["choices"][0]
            delta = choice["delta"]
            reasoning += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
            calls += delta.get("tool_calls") or []
            reason = choice["finish_reason"] or reason
    return reasoning, content, reason, calls


USAGE = Usage(5, 7, 0)


@pytest.mark.parametrize(("name", "text", "want"), PARSER_CASES)
def test_chat_shaper_streams_reasoning_then_content_as_its_whole_response(name, text, want):
    parser = get_reasoning_parser(name)
    streamed = ReasoningChatShaper(ChatShaper("chatcmpl-1", "m", 0, None), parser)
    chunks = [streamed.opening(), *(streamed.delta(text[i : i + 3], None) for i in range(0, len(text), 3))]
    chunks.append(streamed.finish("stop"))
    whole = ReasoningChatShaper(ChatShaper("chatcmpl-1", "m", 0, None), parser)
    message = whole.response(text, None, "stop", USAGE)["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == want
    assert _assemble(chunks) == (want[0] or "", want[1] or "", "stop", [])


def test_tool_calls_are_read_from_the_content_after_the_think_section():
    call = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    text = f"<think>I need the weather.</think>\n<tool_call>\n{call}\n</tool_call>"
    plan = ToolPlan("auto", "[]")

    def shaper():
        tools = ToolChatShaper(ChatShaper("chatcmpl-1", "m", 0, None), plan, get_parser("hermes"))
        return ReasoningChatShaper(tools, get_reasoning_parser("qwen3"))

    message = shaper().response(text, None, "stop", USAGE)["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    assert message["message"]["reasoning_content"] == "I need the weather."
    assert [c["function"]["name"] for c in message["message"]["tool_calls"]] == ["get_weather"]
    streamed = shaper()
    chunks = [streamed.delta(text[i : i + 4], None) for i in range(0, len(text), 4)]
    reasoning, content, reason, calls = _assemble([*chunks, streamed.finish("stop")])
    assert (reasoning, content.strip(), reason) == ("I need the weather.", "", "tool_calls")
    assert json.loads("".join(c["function"].get("arguments") or "" for c in calls)) == {"city": "Oslo"}


def test_the_flag_env_and_kvmesh_up(monkeypatch):
    assert GatewayConfig.from_args([]).reasoning_parser is None
    assert GatewayConfig.from_args(["--reasoning-parser", "deepseek_r1"]).reasoning_parser == "deepseek_r1"
    monkeypatch.setenv("KVMESH_GATEWAY_REASONING_PARSER", "qwen3")
    assert GatewayConfig.from_args([]).reasoning_parser == "qwen3"
    monkeypatch.setenv("KVMESH_GATEWAY_REASONING_PARSER", "nonsense")
    with pytest.raises(SystemExit):
        GatewayConfig.from_args([])
    assert set(REASONING_PARSERS) == {"deepseek_r1", "qwen3"}
    seen = {}
    monkeypatch.setattr(cli, "_up", lambda args: seen.setdefault("args", cli._gateway_args(args)) and 0)
    cli.main(["up", "--reasoning-parser", "deepseek_r1", "--tool-call-parser", "llama3_json"])
    assert seen["args"] == ["--tool-call-parser", "llama3_json", "--reasoning-parser", "deepseek_r1"]
