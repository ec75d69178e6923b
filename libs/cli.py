"""`kvmesh` command line: generate with the engine in-process (and, later, run the whole mesh)."""

from __future__ import annotations

import argparse
import sys
import time

from kvmesh.libs.threads import configure_threads


def _generate(args: argparse.Namespace) -> int:
    configure_threads(args.threads)
    from kvmesh.libs.engine.config import EngineConfig
    from kvmesh.libs.engine.engine import LLMEngine
    from kvmesh.libs.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype))
    prompts = args.prompt or ["Write a short poem about the ocean."]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    for i, text in enumerate(prompts):
        ids = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        ids = engine.tokenizer.encode(ids, add_special_tokens=False) if not args.raw else text
        engine.add_request(str(i), ids, params)
    texts: dict[str, str] = {str(i): "" for i in range(len(prompts))}
    start = time.monotonic()
    num_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            num_tokens += len(out.new_token_ids)
            texts[out.request_id] += out.new_text
            if len(prompts) == 1:
                print(out.new_text, end="", flush=True)
    elapsed = time.monotonic() - start
    if len(prompts) > 1:
        for i, text in enumerate(prompts):
            print(f"### {text}\n{texts[str(i)]}\n")
    print(f"\n[{num_tokens} tokens in {elapsed:.2f} s, {num_tokens / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmesh", description="kvmesh: a KV-cache-aware LLM serving mesh")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate with the engine in this process")
    gen.add_argument(
        "prompt", nargs="*", help="user messages (chat template applied); several run as one batch"
    )
    gen.add_argument("--model", default="SmolLM2-135M-Instruct", help="packaged model name or HF folder")
    gen.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send prompts as plain text, no chat template")
    gen.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
