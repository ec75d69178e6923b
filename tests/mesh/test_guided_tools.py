"""Structured output and tool calling through the whole mesh with the official `openai` client and the
default 135M model: forced tool calls whose arguments validate against the function's schema, streamed
calls that assemble to the non-streamed ones, `json_schema` outputs that validate, `json_object`
outputs that parse. Everything is sent at once (one batch on the workers) to keep the test short."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

# Strings bounded by a pattern, not maxLength: xgrammar 0.2.9's length-bounded strings admit raw
# control characters (tests/engine/test_guided.py).
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
CALLS = [
    ("get_weather", "What will the weather be in Paris tomorrow?"),
    ("get_weather", "Is it going to rain in Tokyo this week? Give me 5 days."),
    ("get_weather", "Fahrenheit forecast for Lima, please."),
    ("get_weather", "Should I pack a coat for Oslo over the next three days?"),
    ("get_weather", "Tell me a joke."),
    ("add", "What is 2 plus 3?"),
    ("add", "Add 1200 and -45."),
    ("add", "Sum of seven and eleven?"),
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,24}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {
            "type": "array",
            "items": {"enum": ["chess", "music", "running", "cooking"]},
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
PEOPLE = ["a chef", "a retired pilot", "a student"]
OBJECT_PROMPTS = [
    'Reply with a JSON object with the key "answer": what is the capital of France?',
    'Give a JSON object with keys "city" and "country" for Rome.',
]


@pytest.fixture
def aclient(mesh):  # per test: an async client belongs to one event loop
    return openai.AsyncOpenAI(base_url=f"{mesh.base_url}/v1", api_key="unused", max_retries=0)


def _named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


async def _tool_call(client, model, name, prompt, stream: bool):
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        tools=TOOLS,
        tool_choice=_named(name),
        max_tokens=60,
        temperature=0,
    )
    if not stream:
        r = await client.chat.completions.create(**kwargs)
        call = r.choices[0].message.tool_calls[0]
        return r.choices[0].finish_reason, call.function.name, call.function.arguments
    chunks = [c async for c in await client.chat.completions.create(stream=True, **kwargs)]
    name_seen, args, reason, ids = None, "", None, set()
    for chunk in chunks:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or ():
            assert delta.index == 0
            if delta.id is not None:
                ids.add(delta.id)
                name_seen = delta.function.name
            args += delta.function.arguments or ""
        reason = choice.finish_reason or reason
    assert len(ids) == 1
    return reason, name_seen, args


async def _structured(client, model, prompt: str, response_format: dict) -> tuple[str, str]:
    r = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        response_format=response_format,
        max_tokens=100,
        temperature=0,
    )
    return r.choices[0].finish_reason, r.choices[0].message.content


async def test_forced_calls_validate_stream_like_whole_and_structured_outputs_validate(aclient):
    model = (await aclient.models.list()).data[0].id
    json_schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    whole, streamed, schema_outputs, object_outputs = await asyncio.gather(  # one batch on the workers
        asyncio.gather(*(_tool_call(aclient, model, name, prompt, False) for name, prompt in CALLS)),
        asyncio.gather(*(_tool_call(aclient, model, name, prompt, True) for name, prompt in CALLS[:2])),
        asyncio.gather(
            *(_structured(aclient, model, f"Describe {who} as JSON.", json_schema) for who in PEOPLE)
        ),
        asyncio.gather(*(_structured(aclient, model, p, {"type": "json_object"}) for p in OBJECT_PROMPTS)),
    )
    for (name, prompt), (reason, called, arguments) in zip(CALLS, whole, strict=True):
        assert reason == "tool_calls" and called == name, prompt
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    assert streamed == whole[:2]
    for reason, content in schema_outputs:
        assert reason == "stop", content
        jsonschema.validate(json.loads(content), PERSON)
    for reason, content in object_outputs:
        assert reason == "stop", content
        assert isinstance(json.loads(content), dict)


async def test_required_choice_auto_parsing_and_refusals(aclient):
    model = (await aclient.models.list()).data[0].id
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    required, auto = await asyncio.gather(
        aclient.chat.completions.create(
            model=model,
            messages=messages,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=60,
            temperature=0,
        ),
        # tool_choice auto: whatever the small model writes comes back as a call or as content, never a 5xx
        aclient.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, max_tokens=40, temperature=0
        ),
    )
    (call,) = required.choices[0].message.tool_calls
    assert required.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    message = auto.choices[0].message
    assert message.tool_calls or message.content
    # the history with a call and its result goes through the template
    history = [
        *messages,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call.model_dump(include={"id", "type", "function"})],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "5"},
    ]
    follow = await aclient.chat.completions.create(
        model=model, messages=history, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    assert follow.choices[0].message.tool_calls is None
    choice = await aclient.completions.create(
        model=model,
        prompt="Is the sky blue? Answer:",
        max_tokens=5,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert choice.choices[0].text in ("yes", "no")
    for extra, field in [
        ({"guided_regex": "(("}, "guided_regex"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            await aclient.chat.completions.create(
                model=model, messages=messages, max_tokens=4, extra_body=extra
            )
        assert err.value.body["param"] == field
