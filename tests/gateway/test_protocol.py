"""Request validation: pydantic bodies, their translation into mesh parameters, and the HTTP errors
(OpenAI's shape, 422 -> 400) of an app whose bus is never reached."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from kvmesh.schemas.messages import ChatMessage
from kvmesh.services.gateway.config import GatewayConfig, ServedModel
from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest

HI = [{"role": "user", "content": "hi"}]


def chat(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": HI, **body})


def test_chat_body_becomes_prompt_and_params():
    body = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": None},
            {"role": "tool", "content": "42"},
        ],
        max_tokens=5,
        max_completion_tokens=7,
        temperature=0,
        top_p=0.5,
        top_k=3,
        seed=11,
        stop="END",
        logprobs=True,
        top_logprobs=2,
        user="alice",
        ignore_eos=True,
        min_tokens=2,
        stop_token_ids=[9],
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        some_future_field=None,  # null asks for nothing: accepted even unknown (request_fields.py)
    )
    prompt, p = body.prompt_and_params()
    assert prompt.messages == [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="one\ntwo"),
        ChatMessage(role="assistant", content=""),
        ChatMessage(role="tool", content="42"),
    ]
    assert prompt.add_generation_prompt
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (7, 0.0, 0.5, 3, 11)
    assert (p.stop, p.logprobs, p.session_id, p.ignore_eos, p.min_tokens) == (("END",), 2, "alice", True, 2)
    assert (p.stop_token_ids, p.include_stop_str_in_output, p.skip_special_tokens) == ((9,), True, False)
    assert p.prompt_param == "messages"


def test_nulls_mean_defaults():
    body = chat(temperature=None, top_p=None, n=None, stop=None, stream=None, max_tokens=None, logprobs=None)
    _, p = body.prompt_and_params()
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.logprobs) == (None, 1.0, 1.0, (), None)
    assert not body.stream and not body.include_usage
    assert chat(logprobs=True).prompt_and_params()[1].logprobs == 0  # the sampled token's only


@pytest.mark.parametrize(
    ("prompt", "text", "ids"),
    [
        ("hello", "hello", None),
        ([1, 2, 3], None, [1, 2, 3]),
        (["hello"], "hello", None),
        ([[4, 5]], None, [4, 5]),
    ],
)
def test_completion_prompt_forms(prompt, text, ids):
    got, p = CompletionRequest(prompt=prompt, logprobs=3, stop=["a", "b", ""]).prompt_and_params()
    assert (got.text, got.token_ids, got.messages) == (text, ids, None)
    assert p.logprobs == 3 and p.stop == ("a", "b") and p.prompt_param == "prompt"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),  # echo alone works
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "presence_penalty": 0.5, "best_of": 2}, "best_of"),
    ],
)
def test_completion_semantic_errors(body, param):
    with pytest.raises(GatewayError) as info:
        CompletionRequest.model_validate(body).prompt_and_params()
    assert info.value.status == 400 and info.value.param == param


def test_chat_semantic_errors():
    with pytest.raises(GatewayError) as info:
        chat(top_logprobs=2).prompt_and_params()
    assert info.value.param == "top_logprobs"
    for bad in ({"n": 2}, {"top_p": 0}, {"temperature": 2.5}, {"logprobs": True, "top_logprobs": 21}):
        with pytest.raises(ValidationError):
            chat(**bad)


def assert_openai_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"] and err["param"] == param
    assert "Traceback" not in r.text
    return err


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HI, "top_p": 2.0}, "top_p"),
        ({"messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"messages": HI, "stop": 7}, "stop"),
        ({"messages": HI, "n": 3}, "n"),
        ({"messages": HI, "temperature": "hot"}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
        ({"messages": HI, "stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
        ({}, "messages"),
    ],
)
async def test_invalid_chat_requests_are_400_in_openai_shape(client, body, param):
    r = await client.post("/v1/chat/completions", json=body)
    err = assert_openai_error(r, 400, param)
    assert err["type"] == "invalid_request_error"


async def test_malformed_json_and_batched_prompts_are_400(client):
    r = await client.post(
        "/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    assert_openai_error(r, 400, None)
    r = await client.post("/v1/completions", json={"prompt": ["a", "b"]})
    assert assert_openai_error(r, 400, "prompt")["code"] == "unsupported"


async def test_unknown_model_is_404_and_unknown_route_too(client, served_model):
    r = await client.post("/v1/chat/completions", json={"model": "gpt-17", "messages": HI})
    assert assert_openai_error(r, 404, "model")["code"] == "model_not_found"
    r = await client.post("/v1/completions", json={"model": "gpt-17", "prompt": "x"})
    assert_openai_error(r, 404, "model")
    assert_openai_error(await client.get("/v1/nothing"), 404, None)


async def test_models_and_health_without_nats(client, served_model):
    r = await client.get("/v1/models")
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert r.json()["object"] == "list"
    assert card["id"] == served_model.name == "SmolLM2-135M-Instruct"
    assert card["object"] == "model" and card["max_model_len"] == 8192
    assert_openai_error(await client.get("/health"), 503, None)


def test_config_flags_and_env(monkeypatch, default_model_path):
    monkeypatch.setenv("KVMESH_GATEWAY_PORT", "9123")
    monkeypatch.setenv("KVMESH_NATS_URL", "nats://10.0.0.1:4333")
    c = GatewayConfig.from_args(
        ["--max-model-len", "1024", "--served-model-name", "smol", "--host", "0.0.0.0"]
    )
    assert (c.port, c.nats_url, c.host, c.max_model_len, c.served_model_name) == (
        9123,
        "nats://10.0.0.1:4333",
        "0.0.0.0",
        1024,
        "smol",
    )
    model = ServedModel.load(c, default_model_path)
    assert model.max_model_len == 1024 and model.name == "smol"
    assert model.accepts("smol") and model.accepts("SmolLM2-135M-Instruct") and model.accepts(None)
    assert not model.accepts("other")
    assert GatewayConfig.from_args([]).max_model_len is None
    with pytest.raises(SystemExit):
        GatewayConfig.from_args(["--request-timeout", "0"])
