"""`kvmesh` command line: generate with the engine in-process (and, later, run the whole mesh)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

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


def _up(args: argparse.Namespace) -> int:
    from kvmesh.libs.gateway_port import PortBusy, choose_port
    from kvmesh.libs.launcher import Mesh, MeshConfig
    from kvmesh.libs.supervisor import GaveUp, Supervisor

    try:
        port, note = choose_port(args.port)
    except PortBusy as exc:
        print(exc, file=sys.stderr)
        return 2
    if note:
        print(note, file=sys.stderr)
    if args.chat_template is not None and not args.chat_template.is_file():
        print(f"kvmesh: --chat-template: no such file: {args.chat_template}", file=sys.stderr)
        return 2
    config = MeshConfig(
        model=args.model,
        dtype=args.dtype,
        num_workers=args.workers,
        num_prefill_workers=args.prefill_workers,
        gateway_port=port,
        nats_url=args.nats_url,
        redis_url=args.redis_url,
        threads_per_worker=args.threads_per_worker,
        log_dir=args.log_dir,
        tokenizer_replicas=args.tokenizer_replicas,
        router_replicas=args.router_replicas,
        kv_index_replicas=args.kv_index_replicas,
        gateway_args=_gateway_args(args),
        tokenizer_args=["--chat-template", str(args.chat_template.resolve())] if args.chat_template else [],
    )
    # Convert the default model once here, before several processes want it at the same time.
    from kvmesh.libs.engine.model_store import ModelNotFoundError, resolve_model

    try:
        resolve_model(args.model)
    except ModelNotFoundError as exc:  # before any process starts: nothing to supervise
        print(f"kvmesh: cannot serve: {exc}", file=sys.stderr)
        return 1
    mesh = Mesh(config)
    supervisor = Supervisor(mesh)  # restarts what dies, from the first start on (libs/supervisor.py)
    mesh.watchdog = supervisor.tick
    # Ctrl-C and SIGTERM both stop the mesh cleanly (a backgrounded shell job ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with mesh:
            kind = "worker(s)"
            if args.prefill_workers:
                kind = f"decode worker(s) + {args.prefill_workers} prefill worker(s)"
            print(f"kvmesh: starting {args.workers} {kind}; NATS {mesh.nats_url}", flush=True)
            mesh.wait_ready(timeout=args.ready_timeout)
            print(f"kvmesh: ready. OpenAI API at {mesh.base_url}/v1  (Ctrl-C stops)", flush=True)
            for p in mesh.procs:
                if p.name == "redis":  # started here: say which server (PATH's, or PyPI's valkey-server)
                    print(f"kvmesh:   redis      {mesh.redis_url} ({p.argv[0]})", flush=True)
            for name, url in mesh.metrics_urls.items():
                print(f"kvmesh:   {name:<10} metrics {url}", flush=True)
            supervisor.run()  # until Ctrl-C / SIGTERM, or a process that cannot start
    except GaveUp as exc:
        print(f"{exc}; stopping", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nkvmesh: stopping", flush=True)
    finally:
        print(supervisor.summary(), flush=True)
    return 0


def _gateway_args(args: argparse.Namespace) -> list[str]:
    """The gateway's flags that `kvmesh up` passes through (left out: the gateway's default or env)."""
    out: list[str] = []
    if args.tool_call_parser:
        out += ["--tool-call-parser", args.tool_call_parser]
    if args.reasoning_parser is not None:
        out += ["--reasoning-parser", args.reasoning_parser]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmesh", description="kvmesh: a KV-cache-aware LLM serving mesh")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate with the engine in this process")
    gen.add_argument(
        "prompt", nargs="*", help="user messages (chat template applied); several run as one batch"
    )
    gen.add_argument("--model", default="SmolLM2-135M-Instruct", help="packaged model name or HF folder")
    gen.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send prompts as plain text, no chat template")
    gen.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    up = sub.add_parser("up", help="run the whole mesh locally (nats-server and redis-server included)")
    up.add_argument(
        "--port",
        type=int,
        default=None,
        help="the API's port (default: KVMESH_PORT, else 8000 or a free one if taken); 0: any free port",
    )
    up.add_argument("--workers", type=int, default=1)
    up.add_argument(
        "--prefill-workers",
        type=int,
        default=0,
        help="> 0: disaggregate: this many prefill workers, the --workers become decode workers",
    )
    up.add_argument("--model", default=os.environ.get("KVMESH_MODEL", "SmolLM2-135M-Instruct"))
    up.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    up.add_argument(
        "--nats-url", default=os.environ.get("NATS_URL"), help="use this NATS instead of starting one"
    )
    up.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="use this Redis instead of starting one"
    )
    up.add_argument("--threads-per-worker", type=int, default=0)
    for service in ("tokenizer", "router", "kv-index"):  # queue groups share the work; one index writer
        up.add_argument(f"--{service}-replicas", type=int, default=1, help=f"{service} processes")
    from kvmesh.services.gateway.reasoning import REASONING_PARSERS
    from kvmesh.services.gateway.tool_parsers import PARSERS

    up.add_argument(
        "--tool-call-parser",
        choices=sorted(PARSERS),
        default=None,
        help="the gateway's: how tool_choice auto reads calls (default: hermes)",
    )
    up.add_argument(
        "--reasoning-parser",
        choices=["", *sorted(REASONING_PARSERS)],
        default=None,
        help="the gateway's: split a chat answer's <think> section into reasoning_content (default: off)",
    )
    up.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        help="the tokenizer's: a Jinja chat template file that replaces the model's",
    )
    up.add_argument("--log-dir", type=Path, default=None, help="write each process's log here")
    up.add_argument("--ready-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "up":
        return _up(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
