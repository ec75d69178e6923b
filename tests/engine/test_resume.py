"""A resumed request (request migration: prompt + its earlier output, resumed_tokens set) continues
exactly where the interrupted one would have gone, for greedy and for seeded sampling."""

import pytest

from kvmesh.libs.engine.config import EngineConfig
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.libs.engine.sampling_params import SamplingParams

PROMPT = [5, 17, 99, 3, 250, 41, 8]


def run(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams) -> list[int]:
    engine.add_request(request_id, prompt, params)
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                tokens += out.new_token_ids
    return tokens


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0.0},
        {"temperature": 1.0, "top_p": 0.9, "seed": 1234},
        # the earlier output still counts as output for the penalties, not as prompt
        {"temperature": 0.0, "frequency_penalty": 0.5, "presence_penalty": 0.3},
    ],
)
def test_resumed_request_continues_the_same_sequence(tiny_model_path, sampling):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_path), dtype="float32"), load_tokenizer=False)
    whole = run(engine, "whole", PROMPT, SamplingParams(max_tokens=20, ignore_eos=True, **sampling))
    assert len(whole) == 20
    done = 7
    params = SamplingParams(max_tokens=20 - done, ignore_eos=True, resumed_tokens=done, **sampling)
    rest = run(engine, "rest", PROMPT + whole[:done], params)
    assert whole[:done] + rest == whole
    # resumed_tokens matters: without it a seeded continuation replays the seed's first draws, and the
    # penalties take the earlier output for prompt
    if "seed" in sampling or "frequency_penalty" in sampling:
        params = SamplingParams(max_tokens=20 - done, ignore_eos=True, **sampling)
        assert run(engine, "naive", PROMPT + whole[:done], params) != whole[done:]
    engine.check_integrity()


def test_resumed_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match="resumed_tokens"):
        SamplingParams(resumed_tokens=-1)
