"""`from kvmesh import LLM, SamplingParams`, as from vllm: the offline API, imported on first use."""

from __future__ import annotations

import subprocess
import sys

from kvmesh.libs.engine import llm, sampling_params


def test_import_kvmesh_stays_light_and_names_the_offline_api():
    code = "import sys, kvmesh; assert 'torch' not in sys.modules; print(kvmesh.__version__)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip()
    from kvmesh import LLM, SamplingParams

    assert LLM is llm.LLM and SamplingParams is sampling_params.SamplingParams


def test_the_offline_llm_applies_penalties_and_logit_bias(tiny_chat_model_path):
    from kvmesh import LLM, SamplingParams

    engine = LLM(str(tiny_chat_model_path), dtype="float32", num_kv_blocks=64)
    base = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
    prompt = [5, 17, 99, 3]
    plain, penalized, biased = engine.generate(
        [prompt] * 3,
        [
            SamplingParams(**base),
            SamplingParams(**base, presence_penalty=2.0, repetition_penalty=100.0),
            SamplingParams(**base, logit_bias={42: 100.0}),
        ],
    )
    assert len(set(plain.token_ids)) < 12  # the random tiny model loops
    assert len(set(penalized.token_ids)) == 12 and not set(penalized.token_ids) & set(prompt)
    assert biased.token_ids == [42] * 12
