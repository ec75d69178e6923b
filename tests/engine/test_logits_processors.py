"""logit_bias, the repetition / frequency / presence penalties and min_p against small pure-Python
references of vLLM's definitions, on fixed logits; batched rows with different parameters (and rows
with none) side by side."""

from __future__ import annotations

import math

import pytest
import torch
from sampling_reference import ref_min_p, ref_penalties

from kvmesh.libs.engine.logits_processors import apply_logit_bias, apply_min_p, apply_penalties
from kvmesh.libs.engine.request import Request
from kvmesh.libs.engine.sampler import Sampler
from kvmesh.libs.engine.sampling_params import InvalidRequestError, SamplingParams

VOCAB = 24


def penalized(row: list[float], prompt: list[int], output: list[int], p: SamplingParams) -> list[float]:
    return ref_penalties(row, prompt, output, p.repetition_penalty, p.frequency_penalty, p.presence_penalty)


def request(prompt: list[int], output: list[int] = (), **params) -> Request:
    """A request whose prompt is `prompt` and which has produced `output` so far."""
    req = Request("r", list(prompt), SamplingParams(max_tokens=64, **params), b"", 0)
    req.token_ids.extend(output)
    return req


def fixed_logits(rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(rows, VOCAB, generator=g) * 3  # both signs, so both repetition branches run


# --- tests ------------------------------------------------------------------------------------------


def test_penalties_match_vllms_formulas_row_by_row():
    prompt = [1, 2, 3, 3]
    output = [3, 5, 5, 5, 7, 2]
    reqs = [
        request(prompt, output, repetition_penalty=1.7),
        request(prompt, output),  # no penalties: its row is left alone
        request(prompt, output, frequency_penalty=0.6),
        request(prompt, output, presence_penalty=-1.2),
        request(prompt, output, repetition_penalty=0.5, frequency_penalty=-0.4, presence_penalty=2.0),
    ]
    logits = fixed_logits(len(reqs))
    expected = [
        penalized(row, prompt, output, r.params) for row, r in zip(logits.tolist(), reqs, strict=True)
    ]
    apply_penalties(logits, reqs)
    torch.testing.assert_close(logits, torch.tensor(expected))


def test_counts_follow_the_output_step_by_step():
    """The output counts are kept incrementally (one new token per step): after several steps they
    equal a count over the whole output, and each step's logits the reference's."""
    prompt = [4, 9]
    req = request(prompt, frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=1.3)
    for token in [9, 9, 11, 4, 9, 0]:
        logits = fixed_logits(1)
        expected = penalized(logits[0].tolist(), prompt, req.output_token_ids, req.params)
        apply_penalties(logits, [req])
        torch.testing.assert_close(logits[0], torch.tensor(expected))
        req.token_ids.append(token)


def test_a_resumed_requests_earlier_output_counts_as_output():
    """Migration resubmits prompt + output so far with resumed_tokens: those tokens are output for
    frequency and presence, exactly as on the worker that produced them."""
    prompt, earlier, later = [1, 2], [6, 6, 8], [6]
    whole = request(prompt, earlier + later, frequency_penalty=0.7, presence_penalty=0.3)
    resumed = request(prompt + earlier, later, frequency_penalty=0.7, presence_penalty=0.3, resumed_tokens=3)
    a, b = fixed_logits(1), fixed_logits(1)
    apply_penalties(a, [whole])
    apply_penalties(b, [resumed])
    torch.testing.assert_close(a, b)
    expected = penalized(fixed_logits(1)[0].tolist(), prompt, earlier + later, whole.params)
    torch.testing.assert_close(a[0], torch.tensor(expected))


def test_logit_bias_is_added_per_row():
    reqs = [request([1], logit_bias={3: 100.0, 0: -5.5}), request([1]), request([1], logit_bias={23: -100.0})]
    logits = fixed_logits(3)
    expected = logits.clone()
    expected[0, 3] += 100.0
    expected[0, 0] -= 5.5
    expected[2, 23] -= 100.0
    apply_logit_bias(logits, reqs)
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_matches_the_reference(min_p):
    logits = fixed_logits(2)
    got = apply_min_p(logits, torch.tensor([min_p, 0.0]))
    torch.testing.assert_close(got[0], torch.tensor(ref_min_p(logits[0].tolist(), min_p)))
    torch.testing.assert_close(got[1], logits[1])  # min_p 0 keeps the row


def test_the_sampler_applies_them_in_vllms_order():
    """Greedy rows take the argmax of bias-then-penalties; a row asking for nothing is not copied."""
    sampler = Sampler(VOCAB)
    logits = fixed_logits(3)
    prompt, output = [0, 1], [2, 2]
    reqs = [
        request(prompt, output, temperature=0.0, logit_bias={5: 100.0}),
        request(prompt, output, temperature=0.0, repetition_penalty=1.5, logit_bias={2: 50.0}),
        request(prompt, output, temperature=0.0),
    ]
    row = logits[1].tolist()
    row[2] += 50.0
    expected_1 = max(range(VOCAB), key=penalized(row, prompt, output, reqs[1].params).__getitem__)
    tokens = sampler(logits.clone(), reqs).token_ids
    assert tokens == [5, expected_1, int(logits[2].argmax())]
    plain = [request(prompt, output, temperature=0.7)]
    assert sampler._processed(logits, plain) is logits  # the fast path: no copy, no work


def test_min_p_keeps_random_draws_within_the_allowed_tokens():
    sampler = Sampler(VOCAB)
    logits = fixed_logits(1)
    allowed = {t for t, x in enumerate(ref_min_p(logits[0].tolist(), 0.2)) if x > -math.inf}
    assert 1 < len(allowed) < VOCAB
    drawn = {
        sampler(logits, [request([1], temperature=1.0, min_p=0.2, seed=s)]).token_ids[0] for s in range(200)
    }
    assert drawn <= allowed
    assert len(drawn) > 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3),
        ("repetition_penalty", 0),
        ("min_p", 1.5),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {1: math.nan}),
    ],
)
def test_out_of_range_parameters_name_their_field(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})
    assert err.value.field == field
