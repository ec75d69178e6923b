"""The Responses API and the reasoning parser through the official `openai` client against the running
mesh: `client.responses.create(...)` plain and streamed answers what transformers' greedy decoding
answers to the same chat (the independent oracle), and a gateway with `--reasoning-parser` (here in
process, on the mesh's NATS) returns a think-style answer as `reasoning_content`, whole and streamed."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from kvmesh.libs.bus import Bus
from kvmesh.services.gateway.app import create_app
from kvmesh.services.gateway.config import GatewayConfig, ServedModel

QUESTION = "What is the capital of France?"  # test_openai_e2e's: the oracle's answer is remembered
MAX_TOKENS = 20


def _check_status(response, output_tokens: int) -> None:
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
        assert output_tokens == MAX_TOKENS
    else:
        assert response.status == "completed" and response.incomplete_details is None


def test_responses_create(client, model, hf_greedy):
    r = client.responses.create(model=model, input=QUESTION, max_output_tokens=MAX_TOKENS, temperature=0)
    assert r.output_text == hf_greedy.chat([{"role": "user", "content": QUESTION}], MAX_TOKENS)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == model
    assert [(o.type, o.role) for o in r.output] == [("message", "assistant")]
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    _check_status(r, r.usage.output_tokens)


def test_responses_create_streamed_with_instructions_and_messages(client, model, hf_greedy):
    instructions = "You answer in one short sentence."
    events = list(
        client.responses.create(
            model=model,
            instructions=instructions,
            input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
            max_output_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
        )
    )
    want = hf_greedy.chat(
        [{"role": "system", "content": instructions}, {"role": "user", "content": QUESTION}], MAX_TOKENS
    )
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == want
    final = events[-1].response
    assert final.output_text == want and final.instructions == instructions
    _check_status(final, final.usage.output_tokens)


@pytest.fixture
async def reasoning_client(mesh):
    """The official async client against a second gateway, in process on the mesh's NATS, that splits
    answers with the deepseek_r1 parser (no `</think>` in an answer: all of it is reasoning)."""
    path = Path(mesh.config.model)
    config = GatewayConfig(nats_url=mesh.nats_url, model=str(path), reasoning_parser="deepseek_r1")
    bus = await Bus.connect(mesh.nats_url, "test-reasoning-gateway")
    app = create_app(
        config, bus, Tokenizer.from_file(str(path / "tokenizer.json")), ServedModel.load(config, path)
    )
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway/v1")
    try:
        yield openai.AsyncOpenAI(
            base_url="http://gateway/v1", api_key="unused", http_client=http, max_retries=0
        )
    finally:
        await http.aclose()
        await bus.close()


async def test_reasoning_parser_puts_the_think_section_in_reasoning_content(reasoning_client, hf_greedy):
    messages = [{"role": "user", "content": QUESTION}]
    want = hf_greedy.chat(messages, MAX_TOKENS)
    assert "</think>" not in want
    model = (await reasoning_client.models.list()).data[0].id
    args = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = await reasoning_client.chat.completions.create(**args)
    message = r.choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == (want, None)
    reasoning, content = "", ""
    async for chunk in await reasoning_client.chat.completions.create(stream=True, **args):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
    assert (reasoning, content) == (want, "")
