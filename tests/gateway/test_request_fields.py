"""Fields a request body does not declare follow one rule (request_fields.py): accepted when they ask
for nothing, else a 400 naming them. The sampling fields that are honoured reach the mesh's parameters.
/version. All on an app whose bus is never reached."""

from __future__ import annotations

from importlib import metadata

import pytest
from pydantic import ValidationError

import kvmesh
from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from kvmesh.services.gateway.request_fields import ANY_VALUE, NOT_HONOURED

HI = [{"role": "user", "content": "hi"}]
ASKS = {"kvmesh-test": 1}  # a value no field's no-op equals


def refusal(body_type: type, body: dict) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        body_type.model_validate(body).prompt_and_params()
    assert info.value.status == 400
    return info.value


def test_penalties_min_p_and_logit_bias_reach_the_parameters():
    body = {
        "messages": HI,
        "frequency_penalty": 0.5,
        "presence_penalty": -1,
        "repetition_penalty": 1.25,
        "min_p": 0.1,
        "logit_bias": {"42": 100, "7": -3.5},
    }
    _, p = ChatCompletionRequest.model_validate(body).prompt_and_params()
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty, p.min_p) == (0.5, -1, 1.25, 0.1)
    assert p.logit_bias == {42: 100.0, 7: -3.5}
    _, p = CompletionRequest(prompt="x").prompt_and_params()  # left out: off
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty, p.min_p, p.logit_bias) == (
        0.0,
        0.0,
        1.0,
        0.0,
        None,
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"logit_bias": {"the": 1}},
        {"logit_bias": {"5": 101}},
        {"logit_bias": {"-1": 1}},
        {"frequency_penalty": 2.1},
        {"presence_penalty": -2.5},
        {"repetition_penalty": 0},
        {"min_p": 1.5},
    ],
)
def test_out_of_range_sampling_fields_are_refused(bad):
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"prompt": "x", **bad})
    assert info.value.errors()[0]["loc"][0] == next(iter(bad))


@pytest.mark.parametrize("name", sorted(NOT_HONOURED))
def test_a_known_field_not_honoured_is_refused_by_name_unless_it_asks_for_nothing(name):
    if name in ChatCompletionRequest.model_fields:
        pytest.skip(f"{name} is honoured now")
    no_ops = NOT_HONOURED[name]
    body = {"messages": HI, name: ASKS}
    if ANY_VALUE in no_ops:
        ChatCompletionRequest.model_validate(body).prompt_and_params()
    else:
        err = refusal(ChatCompletionRequest, body)
        assert (err.param, err.code) == (name, "unsupported_field") and name in err.message
    for value in (None, *(v for v in no_ops if v is not ANY_VALUE)):
        ChatCompletionRequest.model_validate({"messages": HI, name: value}).prompt_and_params()


def test_an_unknown_field_is_refused_unless_null():
    err = refusal(CompletionRequest, {"prompt": "x", "max_token": 5, "best_of": 3})
    assert (err.param, err.code) == ("max_token", "unknown_field")
    assert err.message == "Unrecognized request argument supplied: max_token"
    CompletionRequest.model_validate({"prompt": "x", "max_token": None}).prompt_and_params()
    # a bool is not its no-op 1, nor an int a bool's no-op
    assert refusal(CompletionRequest, {"prompt": "x", "best_of": True}).param == "best_of"
    assert refusal(ChatCompletionRequest, {"messages": HI, "store": 0}).param == "store"


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        (
            "/v1/chat/completions",
            {"messages": HI, "use_beam_search": True},
            "use_beam_search",
            "unsupported_field",
        ),
        ("/v1/completions", {"prompt": "x", "tempurature": 0}, "tempurature", "unknown_field"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": True}, "add_special_tokens", "unsupported_field"),
        ("/detokenize", {"tokens": [1], "frobnicate": 1}, "frobnicate", "unknown_field"),
    ],
)
async def test_refusals_are_openai_errors_naming_the_field(client, path, body, param, code):
    r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert param in err["message"]


async def test_version(client):
    r = await client.get("/version")
    assert r.status_code == 200
    assert r.json() == {"version": kvmesh.__version__} == {"version": metadata.version("kvmesh")}
