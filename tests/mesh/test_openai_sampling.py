"""The sampling surface through the official `openai` client against the running mesh: logit_bias and
vLLM's penalties do what their formulas say (the oracle: transformers' float32 logits with a pure-Python
reference of the formulas, tests/sampling_reference.py), and every field a client may send is either
honoured or refused with a 400 naming it, never ignored (services/gateway/request_fields.py)."""

from __future__ import annotations

import openai
import pytest
from sampling_reference import penalized_greedy

PROMPT = "I like cats. I like cats. I like"  # plain greedy repeats itself here
MAX_TOKENS = 10


def test_logit_bias_of_100_makes_greedy_output_that_token(client, model, hf_greedy):
    paris = hf_greedy.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    r = client.completions.create(
        model=model, prompt="Hello", max_tokens=4, temperature=0, logit_bias={str(paris): 100}
    )
    assert r.choices[0].text == hf_greedy.tokenizer.decode([paris] * 4)
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=3,
        temperature=0,
        logit_bias={str(paris): 100},
    )
    assert r.choices[0].message.content == hf_greedy.tokenizer.decode([paris] * 3)


@pytest.fixture(scope="module")
def plain(client, model, hf_greedy) -> str:
    """The prompt's greedy continuation without penalties: it repeats tokens."""
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    text = r.choices[0].text
    assert len(set(hf_greedy.tokenizer.encode(text, add_special_tokens=False))) < MAX_TOKENS
    return text


@pytest.mark.parametrize(
    ("body", "reference"),
    [
        ({"frequency_penalty": 2.0}, {"frequency": 2.0}),
        # repetition_penalty is vLLM's: the openai client has no argument for it
        ({"presence_penalty": 1.5, "repetition_penalty": 1.3}, {"presence": 1.5, "repetition": 1.3}),
    ],
)
def test_penalties_change_greedy_output_as_the_formulas_predict(
    client, model, hf_greedy, plain, body, reference
):
    prompt = hf_greedy.tokenizer(PROMPT).input_ids
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body=body
    )
    want = hf_greedy.tokenizer.decode(penalized_greedy(hf_greedy.model, prompt, MAX_TOKENS, **reference))
    assert r.choices[0].text == want
    assert want != plain


def test_completions_echo_puts_the_prompt_before_the_completion(client, model, hf_greedy):
    plain = client.completions.create(model=model, prompt="The sky is", max_tokens=3, temperature=0)
    echoed = client.completions.create(
        model=model, prompt="The sky is", max_tokens=3, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "The sky is" + plain.choices[0].text
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens
    ids = hf_greedy.tokenizer.encode("The sky is", add_special_tokens=False)
    stream = client.completions.create(
        model=model, prompt=ids, max_tokens=3, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == echoed.choices[0].text


# Fields a client may send that kvmesh used to ignore or refuse (tool calling, structured output and
# reasoning fields are their own work: tests/mesh for those). "ok": honoured; else the 400's code.
FIELDS = [
    ("logit_bias", {"7042": 5}, "ok"),
    ("logit_bias", {"9999999": 5}, None),  # beyond the vocabulary: the worker names it
    ("frequency_penalty", 0.5, "ok"),
    ("presence_penalty", 0.5, "ok"),
    ("repetition_penalty", 1.1, "ok"),
    ("min_p", 0.1, "ok"),
    ("top_k", 5, "ok"),
    ("metadata", {"team": "a"}, "ok"),  # tags stored completions only: nothing to do
    ("store", False, "ok"),
    ("store", True, "unsupported_field"),
    ("n", 2, None),  # declared: pydantic's range check names it
    ("best_of", 2, "unsupported_field"),
    ("echo", True, "unsupported_field"),
    ("audio", {"voice": "alloy", "format": "wav"}, "unsupported_field"),
    ("modalities", ["text", "audio"], "unsupported_field"),
    ("prediction", {"type": "content", "content": "x"}, "unsupported_field"),
    ("service_tier", "flex", "unsupported_field"),
    ("web_search_options", {}, "unsupported_field"),
    ("use_beam_search", True, "unsupported_field"),
    ("allowed_token_ids", [1, 2], "unsupported_field"),
    ("bad_words", ["cat"], "unsupported_field"),
    ("truncate_prompt_tokens", 8, "unsupported_field"),
    ("prompt_logprobs", 1, "unsupported_field"),
    ("chat_template", "{{ messages }}", "unsupported_field"),
    ("max_tokenz", 5, "unknown_field"),
]


@pytest.mark.parametrize(("field", "value", "outcome"), FIELDS, ids=[f"{f}={v}" for f, v, _ in FIELDS])
def test_each_field_works_or_is_refused_by_name(client, model, field, value, outcome):
    def send():
        return client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            temperature=0,
            extra_body={field: value},
        )

    if outcome == "ok":
        assert send().usage.completion_tokens > 0
        return
    with pytest.raises(openai.BadRequestError) as info:
        send()
    assert info.value.param == field
    assert field in info.value.message
    if outcome is not None:
        assert info.value.code == outcome
