"""The default dtype follows the CPU: bf16 where it is native, fp32 where it would be emulated; an
explicit bf16 runs on any CPU."""

import pytest
import torch

from kvmesh.libs.engine import config
from kvmesh.libs.engine.config import EngineConfig, parse_dtype
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.libs.engine.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ("AVX512", torch.bfloat16),
        ("AMX", torch.bfloat16),
        ("AVX2", torch.float32),
        ("DEFAULT", torch.float32),
    ],
)
def test_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert config.native_bf16() is (expected is torch.bfloat16)
    assert parse_dtype("auto") is expected
    assert EngineConfig().dtype == "auto"


def test_explicit_bf16_runs_on_this_cpu_whatever_it_has(tiny_model_path):
    """On an AVX2-only CPU oneDNN refuses prepacked bf16 weights: the engine must not try them."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_path), dtype="bfloat16"), load_tokenizer=False)
    engine.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    assert len(tokens) == 4
