"""Guided decoding in the engine: a random tiny model (with the default model's tokenizer) under a
grammar still writes valid output, the mask touches only guided rows, a finished grammar stops the
request, compiled grammars are cached by spec, and a resumed (migrated) request continues in the
same grammar state."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from kvmesh.libs.engine.config import EngineConfig
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.libs.engine.guided import mask_logits
from kvmesh.libs.engine.sampling_params import GrammarSpec, InvalidRequestError, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        # not maxLength: xgrammar 0.2.9's length-bounded strings admit raw control characters
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
PROMPT = [5, 17, 99, 3, 250, 41, 8]


@pytest.fixture(scope="module")
def engine(tiny_chat_model_path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_chat_model_path), dtype="float32"))


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple]:
    """request id -> (token ids, text, finish reason)."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens = {rid: [] for rid in requests}
    text = dict.fromkeys(requests, "")
    reasons = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            text[out.request_id] += out.new_text
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    engine.check_integrity()
    return {rid: (tokens[rid], text[rid], reasons[rid]) for rid in requests}


def test_random_model_writes_valid_output_beside_free_rows(engine):
    schema = GrammarSpec("json_schema", json.dumps(SCHEMA))
    requests = {
        f"json-{i}": (PROMPT[: 3 + i], SamplingParams(max_tokens=80, temperature=1.0, seed=i, guided=schema))
        for i in range(4)
    }
    requests["choice"] = (
        PROMPT,
        SamplingParams(max_tokens=20, guided=GrammarSpec("choice", '["yes", "no"]')),
    )
    requests["regex"] = (
        PROMPT,
        SamplingParams(max_tokens=20, guided=GrammarSpec("regex", r"[a-c]{2}-\d{3}")),
    )
    requests["object"] = (
        PROMPT,
        SamplingParams(max_tokens=120, temperature=0.7, guided=GrammarSpec("json_object")),
    )
    requests["free"] = (PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    out = run_all(engine, requests)
    for i in range(4):
        _, text, reason = out[f"json-{i}"]
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert out["choice"][1] in ("yes", "no") and out["choice"][2] == "stop"
    assert re.fullmatch(r"[a-c]{2}-\d{3}", out["regex"][1]) and out["regex"][2] == "stop"
    if out["object"][2] == "stop":  # a random model may nest until its budget ends
        assert isinstance(json.loads(out["object"][1]), dict)
    # the free request's tokens are what it makes alone (its row was not masked)
    alone = run_all(engine, {"alone": requests["free"]})["alone"]
    assert out["free"][0] == alone[0] and len(alone[0]) == 12


def test_mask_leaves_unguided_rows_untouched(engine):
    spec = GrammarSpec("choice", '["yes", "no"]')
    engine.add_request("g", PROMPT, SamplingParams(max_tokens=4, guided=spec))
    engine.add_request("f", PROMPT, SamplingParams(max_tokens=4))
    reqs = [engine.requests["f"], engine.requests["g"]]
    logits = torch.randn(2, engine.model.cfg.vocab_size)
    masked = mask_logits(logits, [r.guided for r in reqs])
    assert torch.equal(masked[0], logits[0])
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert 0 < len(allowed) < 10
    assert all(
        "yes".startswith(t) or "no".startswith(t)
        for t in engine.tokenizer.batch_decode([[a] for a in allowed])
    )
    assert mask_logits(logits, [reqs[0].guided]) is logits  # no guided row: no copy, no work
    for rid in ("f", "g"):
        engine.abort_request(rid)
    engine.step()


def test_compiled_grammars_are_cached_by_spec_and_bad_ones_name_their_field(engine):
    cache = engine.grammars
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA) + " ")  # a spec of its own
    before = cache.compilations
    assert cache.compile(spec) is cache.compile(GrammarSpec(spec.kind, spec.value, "guided_json"))
    assert cache.compilations == before + 1
    with pytest.raises(InvalidRequestError) as err:
        cache.compile(GrammarSpec("regex", "((", field="guided_regex"))
    assert err.value.field == "guided_regex"


def test_resumed_request_continues_in_the_same_grammar_state(engine):
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    sampling = {"temperature": 1.0, "seed": 7, "guided": spec}
    whole, text, reason = run_all(engine, {"whole": (PROMPT, SamplingParams(max_tokens=80, **sampling))})[
        "whole"
    ]
    assert reason == "stop"
    done = 5
    params = SamplingParams(max_tokens=80 - done, resumed_tokens=done, **sampling)
    rest, _, reason = run_all(engine, {"rest": (PROMPT + whole[:done], params)})["rest"]
    assert whole[:done] + rest == whole and reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    # resumed tokens the grammar cannot have produced are refused, naming the grammar's field
    with pytest.raises(InvalidRequestError, match="resumed output"):
        engine.add_request("bad", PROMPT + [PROMPT[0]] * 3, SamplingParams(resumed_tokens=3, guided=spec))
