"""Request-level behaviour of the engine on the real default model (bf16, the serving default)."""

import pytest

from kvmesh.libs.engine.llm import LLM
from kvmesh.libs.engine.sampling_params import InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def llm(default_model_path):
    return LLM(str(default_model_path), max_model_len=512)


@pytest.fixture(scope="module")
def prompt(llm):
    return llm.chat_prompt(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": 5}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"temperature": -1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"logprobs": 50}, "logprobs"),
        ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
        ({"n": 2}, "n"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field and field in str(err.value)


def test_bad_prompts_are_refused_and_the_engine_keeps_serving(llm, prompt):
    engine = llm.engine
    engine.add_request("good", prompt, SamplingParams(max_tokens=8, temperature=0))
    for bad, field in [
        ([], "prompt"),
        ("", "prompt"),
        ([1] * 600, "prompt"),
        ([10**9], "prompt"),
        (42, "prompt"),
    ]:
        with pytest.raises(InvalidRequestError) as err:
            engine.add_request("bad", bad, SamplingParams())
        assert err.value.field == field
    with pytest.raises(InvalidRequestError, match="context"):
        engine.add_request("long", [5] * 512, SamplingParams())
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [o.request_id for o in outs if o.finished] == ["good"]
    assert sum(len(o.new_token_ids) for o in outs) == 8
    engine.check_integrity()


def test_max_tokens_stop_ids_ignore_eos_and_min_tokens(llm, prompt):
    greedy = SamplingParams(max_tokens=200, temperature=0)
    (full,) = llm.generate(prompt, greedy)
    assert full.finish_reason == "stop" and full.token_ids[-1] == 2  # <|im_end|>
    (short,) = llm.generate(prompt, SamplingParams(max_tokens=5, temperature=0))
    assert short.finish_reason == "length" and short.token_ids == full.token_ids[:5]
    third = full.token_ids[2]
    (stop_id,) = llm.generate(prompt, SamplingParams(max_tokens=50, temperature=0, stop_token_ids=[third]))
    assert stop_id.finish_reason == "stop" and stop_id.token_ids == full.token_ids[:3]
    n = len(full.token_ids)
    (no_eos,) = llm.generate(prompt, SamplingParams(max_tokens=n + 5, temperature=0, ignore_eos=True))
    assert len(no_eos.token_ids) == n + 5 and no_eos.finish_reason == "length"
    (min_tok,) = llm.generate(prompt, SamplingParams(max_tokens=n + 5, min_tokens=n + 2, temperature=0))
    assert len(min_tok.token_ids) >= n + 2 and 2 not in min_tok.token_ids[: n + 1]


def test_stop_strings_cut_the_text(llm, prompt):
    (full,) = llm.generate(prompt, SamplingParams(max_tokens=60, temperature=0))
    words = full.text.split()
    stop = " ".join(words[3:5])  # two words: very likely to span several tokens
    (cut,) = llm.generate(prompt, SamplingParams(max_tokens=60, temperature=0, stop=[stop, "zzz-never"]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    (kept,) = llm.generate(
        prompt, SamplingParams(max_tokens=60, temperature=0, stop=stop, include_stop_str_in_output=True)
    )
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm, prompt):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    (alone,) = llm.generate(prompt, params)
    others = [SamplingParams(max_tokens=20, temperature=1.2) for _ in range(3)]
    batched = llm.generate([prompt] * 4, [*others[:2], params, others[2]])
    assert batched[2].token_ids == alone.token_ids
    (other_seed,) = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=8))
    assert other_seed.token_ids != alone.token_ids


def test_top_k_1_and_tiny_top_p_are_greedy(llm, prompt):
    (greedy,) = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0))
    (k1,) = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=1.5, top_k=1))
    (p0,) = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=1.5, top_p=1e-6))
    assert k1.token_ids == greedy.token_ids == p0.token_ids


def test_logprobs(llm, prompt):
    (out,) = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0, logprobs=3))
    assert len(out.logprobs) == 6
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.top[0][0] == tok and lp.top[0][1] == pytest.approx(lp.logprob)  # greedy: best token
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and lp.logprob <= 0


def test_text_prompts_and_token_prompts_agree(llm):
    text = "The quick brown fox"
    ids = llm.engine.tokenizer.encode(text, add_special_tokens=False)
    a, b = llm.generate([text, ids], SamplingParams(max_tokens=8, temperature=0))
    assert a.token_ids == b.token_ids and a.text == b.text
