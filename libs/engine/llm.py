"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from kvmesh.libs.engine.config import EngineConfig
from kvmesh.libs.engine.engine import LLMEngine
from kvmesh.libs.engine.outputs import CompletionOutput
from kvmesh.libs.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **engine_kwargs) -> None:
        cfg = EngineConfig(model=model, **engine_kwargs) if model else EngineConfig(**engine_kwargs)
        self.engine = LLMEngine(cfg)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Run every prompt to completion in one continuous batch; results in prompt order.
        A single prompt is text or a list of token ids; a list of lists is many prompts."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        results: dict[str, CompletionOutput] = {}
        order = []
        for prompt, p in zip(prompts, per_prompt, strict=True):
            rid = f"offline-{next(self._ids)}"
            req = self.engine.add_request(rid, prompt, p)
            results[rid] = CompletionOutput(rid, req.prompt_token_ids)
            order.append(rid)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.request_id in results:
                    results[out.request_id].add(out)
        return [results[r] for r in order]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat rendered with the model's template, ready for generate()."""
        tok = self.engine.tokenizer
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
