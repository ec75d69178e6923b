"""Schemathesis against the gateway's own OpenAPI schema, on a real running gateway in front of a real
mesh: every operation, valid and invalid bodies, never a 5xx, never a hang, and every answer is what
the schema says: a documented status, a documented content type, a body that conforms to the response
model of that status (services/gateway/openapi.py), each event of a stream too.

The contract under test is HTTP's, not the model's: the mesh serves the tiny chat model (random
weights, the real tokenizer and chat template, milliseconds a step), so that answering a request is
cheap. Generated bodies are mostly refused (400) for reasons across fields that a JSON schema cannot
state; so that the 200 bodies get checked too, a share of the valid (positive) bodies of the generation
routes is made acceptable (`_acceptable`), half of them streamed, and the run must have produced
enough whole and streamed 200 answers. Besides schemathesis' own checks, every 200 answer of a
generation route is validated here against the same pydantic models the schema is built from, each
`data:` event of a stream by itself.

The gateway here is a second one on the mesh's NATS, with an API key (sent by the fuzzer), small limits
so that accepted requests stay cheap, and DEBUG logs that are then searched for the key."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kvmesh.libs.launcher import Mesh, MeshConfig, free_port
from kvmesh.services.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from kvmesh.services.gateway.openapi import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ErrorResponse,
)

API_KEY = "sk-fuzz-5b1e0c7a9d"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT_S = 60  # per call: a hang fails the test
EXAMPLES = 80  # per operation (hypothesis stops sooner for one without inputs, e.g. GET /v1/models)
DEADLINE_S = 180  # per operation, a hard bound (pytest-timeout)
MAX_TOKENS = 4  # the gateway's cap: a stream is at most 8 events, under schemathesis' 20 per stream
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# route -> the models of its 200 answer: the whole one, and each event of its stream
GENERATION_ROUTES: dict[str, tuple[type[BaseModel], TypeAdapter]] = {
    "POST /v1/chat/completions": (ChatCompletion, TypeAdapter(ChatCompletionChunk | ErrorResponse)),
    "POST /v1/completions": (Completion, TypeAdapter(CompletionChunk | ErrorResponse)),
}
REQUESTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
MIN_OK = 3  # 200 answers of each kind (whole, streamed) that each generation route must have had
SENT: collections.Counter[str] = collections.Counter()  # requests sent, by operation
ANSWERED: collections.Counter[tuple[str, int]] = collections.Counter()  # generation routes: (route, status)
OK: collections.Counter[tuple[str, str]] = collections.Counter()  # checked 200 answers: (route, kind)


@pytest.fixture(scope="module")
def fuzz_mesh(tiny_chat_model_path, tmp_path_factory) -> Mesh:
    config = MeshConfig(
        model=str(tiny_chat_model_path),
        dtype="float32",
        num_workers=1,
        log_dir=tmp_path_factory.mktemp("fuzz-mesh-logs"),
        metrics=False,
    )
    with Mesh(config) as m:
        m.wait_ready(timeout=180)
        yield m


@pytest.fixture(scope="module")
def fuzz_gateway(fuzz_mesh, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("fuzz-gateway") / "gateway.log"
    env = {
        **os.environ,
        "KVMESH_NATS_URL": fuzz_mesh.nats_url,
        "KVMESH_MODEL": fuzz_mesh.config.model,
        "KVMESH_API_KEYS": API_KEY,
        "KVMESH_LOG_LEVEL": "DEBUG",
        "KVMESH_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    argv = [sys.executable, "-m", "kvmesh.services.gateway", "--port", str(port)]
    argv += ["--max-tokens-cap", str(MAX_TOKENS), "--max-prompt-tokens", "256", "--max-body-bytes", "65536"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the fuzzed gateway did not come up"
                time.sleep(0.1)
        yield base, log
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def api_schema(fuzz_gateway):
    base, _ = fuzz_gateway
    raw = json.loads(urllib.request.urlopen(_authorized(f"{base}/openapi.json"), timeout=10).read())
    # A random model name is a 404 before anything runs: the positive examples name the served model
    # (or none), so that they reach the workers and their answers, streams included, get checked.
    model = json.loads(urllib.request.urlopen(_authorized(f"{base}/v1/models"), timeout=10).read())
    served = model["data"][0]["id"]
    for component in raw["components"]["schemas"].values():
        if "model" in component.get("properties", {}):
            component["properties"]["model"] = {"anyOf": [{"enum": [served]}, {"type": "null"}]}
    loaded = schemathesis.openapi.from_dict(raw)
    loaded.hook(flatmap_case)
    return loaded


def _authorized(url: str) -> urllib.request.Request:
    return urllib.request.Request(url, headers=HEADERS)


# Valid fields that the gateway refuses all the same (openai_protocol.py: checks across fields, what the
# mesh does not support, limits) or that a random value makes slow: an acceptable body goes without them.
_REFUSED = (
    "n",  # only 1
    "logit_bias",  # ids beyond the vocabulary
    "echo",
    "suffix",
    "min_tokens",  # may exceed max_tokens, or make a long answer
    "stop_token_ids",  # ids beyond the vocabulary
    "max_completion_tokens",  # over the cap (max_tokens is drawn instead)
)
_MADE: collections.Counter[str] = collections.Counter()  # acceptable bodies made, by path
PROMPT_CHARS = 40  # a shortened prompt or message: at most ~4 tokens a character, under max-prompt-tokens


def flatmap_case(context, case):
    """Schemathesis hook (api_schema): a drawn share of the valid bodies of a generation route is made
    acceptable (`_acceptable`); negative and other cases stay as generated."""
    route = f"{case.method.upper()} {case.path}"
    positive = case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE
    if route not in GENERATION_ROUTES or not positive or not isinstance(case.body, dict):
        return st.just(case)
    max_tokens = st.none() | st.integers(1, MAX_TOKENS)  # none: the cap
    return st.tuples(st.booleans(), max_tokens).map(lambda c: _acceptable(case, *c))


def _parses(path: str, body) -> bool:
    """Whether the gateway's request model takes `body` (a case generated as valid may not be)."""
    try:
        REQUESTS[path].model_validate(body)
    except ValidationError:
        return False
    return True


def _acceptable(case, as_generated: bool, max_tokens: int | None):
    """`case` with a body the gateway serves: the generated one without the refused fields, its prompt
    or messages shortened, at most MAX_TOKENS tokens; every other one streamed, half of those with usage
    (taking turns: hypothesis' own draws of a boolean lean far to one side)."""
    if as_generated:
        return case
    declared = REQUESTS[case.path].model_fields  # undeclared fields are refused (request_fields.py)
    body = {k: v for k, v in case.body.items() if k in declared and k not in _REFUSED}
    if not _parses(case.path, body):
        return case
    turn = _MADE[case.path]
    _MADE[case.path] += 1
    body |= {"max_tokens": max_tokens, "stream": turn % 2 == 1}
    if body["stream"]:
        body["stream_options"] = {"include_usage": turn % 4 == 3}
    else:
        body.pop("stream_options", None)
    if "messages" in body:
        body["messages"] = [{**m, "content": _short(m.get("content"))} for m in body["messages"][:2]]
        if not body.get("logprobs"):
            body.pop("top_logprobs", None)
    else:
        body["prompt"] = _short_prompt(body["prompt"])
    case.body = body
    return case


def _short(content):
    if isinstance(content, str):
        return content[:PROMPT_CHARS]
    if isinstance(content, list):
        return [{**part, "text": part["text"][:PROMPT_CHARS]} for part in content[:1]]
    return content


def _short_prompt(prompt):
    """One prompt (a list of several is refused), short, not empty, of token ids in any vocabulary."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt[:PROMPT_CHARS] or "Once upon a time"
    return [int(t) % 256 for t in prompt[:PROMPT_CHARS]] or [1]  # JSON's integers: 1.0 too


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples every run
)
@pytest.mark.timeout(DEADLINE_S)
def test_every_answer_is_as_documented(case, fuzz_gateway):
    base, _ = fuzz_gateway
    route = f"{case.method.upper()} {case.path}"
    SENT[route] += 1
    response = case.call_and_validate(base_url=base, headers=HEADERS, checks=CHECKS, timeout=TIMEOUT_S)
    if route in GENERATION_ROUTES:
        ANSWERED[route, response.status_code] += 1
        if response.status_code == 200:
            OK[route, _check_ok(route, response)] += 1


def _check_ok(route: str, response) -> str:
    """A 200 answer of a generation route against its models: "json" or "stream" (which it was)."""
    whole, event = GENERATION_ROUTES[route]
    content_type = response.headers.get("content-type", [""])[0]
    if content_type.startswith("application/json"):
        whole.model_validate_json(response.content, strict=True)
        return "json"
    assert content_type.startswith("text/event-stream"), content_type
    assert not response.stream_cut_short, "a stream of at most MAX_TOKENS tokens ended"
    events = [e for e in response.content.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]", events
    for e in events[:-1]:
        assert e.startswith("data: ") and "\n" not in e, e
        event.validate_json(e.removeprefix("data: "), strict=True)
    return "stream"


def test_the_generation_routes_were_fuzzed_in_earnest():
    """After the fuzzing above: each main route got its examples (not a handful), and enough of them
    were answered 200, whole and streamed, for their bodies to have been held to the schema."""
    print(dict(ANSWERED), dict(OK))  # the tally, for the log (pytest -rP)
    for route in GENERATION_ROUTES:
        assert SENT[route] >= EXAMPLES * 5 // 6, dict(SENT)
        for kind in ("json", "stream"):
            assert OK[route, kind] >= MIN_OK, f"{route}: {kind} 200s {dict(OK)}, statuses {dict(ANSWERED)}"


def test_the_key_never_reached_the_logs(fuzz_gateway):
    """After the fuzzing (hundreds of authorized requests, DEBUG logging) and a few refused ones."""
    base, log = fuzz_gateway
    for auth in (f"Bearer {API_KEY}x", API_KEY):
        req = urllib.request.Request(f"{base}/v1/models", headers={"Authorization": auth})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 401
    text = log.read_text()
    assert "DEBUG" in text or "INFO" in text, "the log is being written"
    assert API_KEY not in text
