"""The load a worker reports (outstanding tokens) leaves out what its prefix cache already holds:
KV-aware routing weighs that load against prefix hits, so a waiting request whose prompt is cached
must not count as a full prefill."""

from kvmesh.libs.engine.config import EngineConfig
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.libs.engine.sampling_params import SamplingParams


def test_a_waiting_requests_cached_prompt_tokens_are_not_outstanding(tiny_model_path):
    engine = LLMEngine(
        EngineConfig(model=str(tiny_model_path), dtype="float32", num_kv_blocks=64), load_tokenizer=False
    )
    prefix = list(range(10, 74))  # 4 blocks of 16
    params = SamplingParams(max_tokens=5, temperature=0)
    engine.add_request("a", [*prefix, 1, 2, 3], params)
    assert engine.stats().outstanding_tokens == 67 + 5, "nothing cached yet: the whole prompt"
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("b", [*prefix, 4, 5, 6], params)  # waiting, its prefix cached
    assert engine.stats().outstanding_tokens == 3 + 5
    engine.step()
    assert engine.stats().outstanding_tokens == 1 + 4, "admitted and sampled once: 4 tokens to go"
