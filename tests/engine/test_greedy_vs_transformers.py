"""The engine's greedy output equals transformers' generate, token for token, on the real model,
with every engine feature exercised at once: one mixed continuous batch, prefix-cache hits, chunked
prefill and a KV cache small enough to force preemption.

float32 on both sides: bf16 rounding differs between any two implementations of the same math, so
only fp32 makes token-for-token equality a fair test of the forward pass and the paged cache.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvmesh.libs.engine.llm import LLM
from kvmesh.libs.engine.sampling_params import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 3?",
    "Give me a name for a pet turtle.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What does a CPU do?",
    "Write a Python function that reverses a string.",
    "Name a famous painter from the Netherlands.",
    "How many legs does a spider have?",
    "Suggest a healthy breakfast.",
    "What is the boiling point of water at sea level in Celsius?",
    "Describe the color green to someone who cannot see.",
    "Tell me a short joke about computers.",
    "What is photosynthesis? Answer in detail, covering light reactions, the Calvin cycle, where in the "
    "cell each happens, and why plants need both water and carbon dioxide for the process to work.",
    "Compare cats and dogs as pets in a few sentences, considering space, cost, time and temperament.",
    "What year did the first person walk on the moon?",
]
MAX_TOKENS = 24


def chats() -> list[list[dict]]:
    # every other question (and the two long ones): 14 prompts still overflow the small cache, and
    # each costs transformers ~2-3 s of fp32 generate on an AVX2 CPU
    questions = QUESTIONS[:16:2] + QUESTIONS[17:19]
    out = [[{"role": "user", "content": q}] for q in questions]
    # multi-turn chats share a whole earlier turn with another prompt: prefix-cache hits inside the batch
    out.append(
        [
            {"role": "user", "content": QUESTIONS[0]},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Italy?"},
        ]
    )
    out.append(
        [
            {"role": "system", "content": "You are a terse assistant. Reply in at most ten words."},
            {"role": "user", "content": QUESTIONS[7]},
        ]
    )
    return out


@pytest.fixture(scope="module")
def llm(default_model_path):
    # 28 blocks of 16 tokens cannot hold 14 prompts of 40-90 tokens plus outputs: preemption is forced.
    return LLM(str(default_model_path), dtype="float32", num_kv_blocks=28, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def reference(default_model_path, llm):
    hf = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    refs = []
    with torch.inference_mode():
        for chat in chats():
            ids = llm.chat_prompt(chat)
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
            refs.append(gen[0, len(ids) :].tolist())
    return refs


def test_greedy_equals_transformers_with_everything_on(llm, reference):
    prompts = [llm.chat_prompt(c) for c in chats()]
    assert max(len(p) for p in prompts) > 64, "some prompt must need chunked prefill"
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0, "the small cache must have forced preemption"
    assert stats.prefix_hit_tokens > 0, "the shared system prompt must have hit the prefix cache"
    for i, (out, ref) in enumerate(zip(outs, reference, strict=True)):
        assert out.token_ids == ref, f"prompt {i}: {out.text!r}"
    llm.engine.check_integrity()
    assert stats.num_running == 0 and llm.engine.stats().num_free_blocks == stats.num_blocks


def test_prefix_cache_hit_gives_the_same_tokens(llm, reference):
    prompts = [llm.chat_prompt(c) for c in chats()[:6]]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    cold = [o.token_ids for o in llm.generate(prompts, params)]
    warm = llm.generate(prompts, params)
    assert all(o.num_cached_tokens > 0 for o in warm)
    assert [o.token_ids for o in warm] == cold == reference[:6]
