"""Gateway configuration: flags with environment fallbacks, parsed once; and the served model's card."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.libs.service import add_common_args, env_default
from kvmesh.services.gateway.reasoning import REASONING_PARSERS
from kvmesh.services.gateway.tool_parsers import PARSERS


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "SmolLM2-135M-Instruct"  # packaged model name or HF folder (for the tokenizer and context)
    served_model_name: str | None = None  # None: the model's name (its folder name for a path)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # seconds from dispatch (the request leaves the flow-control queue, whose wait --queue-ttl bounds)
    request_timeout: float = 600.0  # ... to the last token
    first_token_timeout: float = 120.0  # ... to the first token
    token_timeout: float = 120.0  # longest silence between two tokens on a stream
    bus_timeout: float = 10.0  # one NATS request to a worker; all tries of one to the tokenizer or router
    # Tokenizer and router requests (control.py): a try unanswered this long is hedged by one to every
    # replica (a hung replica swallows its share), up to control_tries tries within bus_timeout. A
    # tokenizer try gets 4 s more per MiB of text (a context-length prompt encodes in ~10 ms).
    tokenizer_try_timeout: float = 1.0
    router_try_timeout: float = 1.0
    control_tries: int = 3
    # Request migration: a stream silent this long makes the gateway ask its worker whether it still
    # holds the request; no responder, "no" or no answer within probe_timeout moves the request.
    liveness_interval: float = 1.0
    probe_timeout: float = 2.0
    max_migrations: int = 3  # moves per request (worker deaths it survives)
    # Admission and limits (0: unbounded / the model's context)
    # generation requests in the gateway at once, queued ones included (a memory guard); beyond: 429
    max_inflight: int = 8192
    # Flow control (flow.py): requests the workers have no room for wait in the gateway's queue, up to
    # max_queue of them (0: none wait, 429 at once) and for at most queue_ttl seconds (then 429).
    max_queue: int = 4096
    queue_ttl: float = 600.0
    worker_headroom: int = 4  # requests dispatched to a worker beyond its running batch
    # 1: the worker's scheduler also orders by the tenant's requests in flight (a newcomer's prefill
    # goes ahead of another tenant's burst); 0: by priority band only
    tenant_rank: int = 1
    max_body_bytes: int = 1 << 20  # beyond: 413
    max_prompt_tokens: int = 0  # beyond: 400
    max_tokens_cap: int = 0  # larger max_tokens: 400; also the default when max_tokens is left out
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: no authentication
    log_level: str = "INFO"
    # How `tool_choice: auto` finds calls in the model's text (vLLM's --tool-call-parser names):
    # hermes | llama3_json (services/gateway/tool_parsers.py)
    tool_call_parser: str = "hermes"
    # How a chat answer's think section becomes `reasoning_content` (vLLM's --reasoning-parser names):
    # deepseek_r1 | qwen3 (services/gateway/reasoning.py); None: the text stays whole
    reasoning_parser: str | None = None

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> GatewayConfig:
        d = cls()  # the defaults (a slots dataclass has no class-level field values)
        p = argparse.ArgumentParser(prog="kvmesh-gateway", description="kvmesh OpenAI-compatible gateway")
        add_common_args(p, metrics_port=False)  # --nats-url, --model, --log-level; /metrics is on --port
        p.add_argument("--host", default=env_default("KVMESH_GATEWAY_HOST", d.host))
        p.add_argument("--port", type=int, default=env_default("KVMESH_GATEWAY_PORT", d.port))
        p.add_argument(
            "--served-model-name",
            default=env_default("KVMESH_SERVED_MODEL_NAME", None),
            help="the model name clients use (default: the model's own name)",
        )
        p.add_argument(
            "--max-model-len",
            type=int,
            default=env_default("KVMESH_MAX_MODEL_LEN", 0),
            help="context length in tokens (0: the model's max_position_embeddings)",
        )
        # numeric knobs: flag --x-y, env KVMESH_GATEWAY_X_Y, the field's type and default
        for name in (*_POSITIVE, *_NON_NEGATIVE):
            default = getattr(d, name)
            flag, env = "--" + name.replace("_", "-"), "KVMESH_GATEWAY_" + name.upper()
            p.add_argument(flag, type=type(default), default=env_default(env, default))
        p.add_argument(
            "--api-keys-file",
            default=env_default("KVMESH_API_KEYS_FILE", None),
            help="a file with one API key per line (KVMESH_API_KEYS: comma-separated keys)",
        )
        p.add_argument(
            "--tool-call-parser",
            choices=sorted(PARSERS),
            default=env_default("KVMESH_GATEWAY_TOOL_CALL_PARSER", d.tool_call_parser),
            help="how tool calls are read from the model's text with tool_choice auto",
        )
        p.add_argument(
            "--reasoning-parser",
            choices=["", *sorted(REASONING_PARSERS)],
            default=env_default("KVMESH_GATEWAY_REASONING_PARSER", d.reasoning_parser or ""),
            help="split a chat answer's <think> section into reasoning_content (default: off)",
        )
        a = p.parse_args(argv)
        if a.reasoning_parser and a.reasoning_parser not in REASONING_PARSERS:  # from the environment
            p.error(f"--reasoning-parser: one of {sorted(REASONING_PARSERS)}, got {a.reasoning_parser!r}")
        for name in _POSITIVE:
            if getattr(a, name) <= 0:
                p.error(f"--{name.replace('_', '-')} must be > 0")
        for name in _NON_NEGATIVE:
            if getattr(a, name) < 0:
                p.error(f"--{name.replace('_', '-')} must be >= 0")
        numbers = {name: getattr(a, name) for name in (*_POSITIVE, *_NON_NEGATIVE)}
        return cls(
            nats_url=a.nats_url,
            host=a.host,
            port=a.port,
            model=a.model,
            served_model_name=a.served_model_name or None,
            max_model_len=a.max_model_len or None,
            **numbers,
            api_keys=load_api_keys(os.environ.get("KVMESH_API_KEYS", ""), a.api_keys_file),
            log_level=a.log_level,
            tool_call_parser=a.tool_call_parser,
            reasoning_parser=a.reasoning_parser or None,
        )


_POSITIVE = (
    "request_timeout",
    "first_token_timeout",
    "token_timeout",
    "bus_timeout",
    "liveness_interval",
    "probe_timeout",
    "tokenizer_try_timeout",
    "router_try_timeout",
    "control_tries",
    "queue_ttl",
)
_NON_NEGATIVE = (
    "max_migrations",
    "max_inflight",
    "max_queue",
    "worker_headroom",
    "tenant_rank",
    "max_body_bytes",
    "max_prompt_tokens",
    "max_tokens_cap",
)


def load_api_keys(env_value: str, path: str | None) -> tuple[str, ...]:
    """Keys from a comma-separated string (KVMESH_API_KEYS) and a file of one key per line (`#` starts a
    comment). Keys are taken from the environment or a file only, never from flags: a flag's value is
    visible to every user of the machine in `ps`."""
    keys = [k.strip() for k in env_value.split(",")]
    if path:
        for line in Path(path).read_text().splitlines():
            keys.append(line.split("#", 1)[0].strip())
    return tuple(dict.fromkeys(k for k in keys if k))


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What the gateway tells clients about the model, and the names it answers to."""

    name: str
    aliases: frozenset[str]
    path: Path
    max_model_len: int
    created: int

    @classmethod
    def load(cls, config: GatewayConfig, path: Path) -> ServedModel:
        """`path` is the model's HF folder (`resolve_model(config.model)`)."""
        raw = json.loads((path / "config.json").read_text())
        native = int(raw.get("max_position_embeddings") or 2048)
        # Like the engine: a configured length can shorten the context, never extend it.
        max_len = min(config.max_model_len, native) if config.max_model_len else native
        # A packaged model's folder carries its name; a local folder's name is the model's name.
        name = config.served_model_name or path.name
        return cls(
            name=name,
            aliases=frozenset({name, path.name, config.model}),
            path=path,
            max_model_len=max_len,
            created=int(time.time()),
        )

    def accepts(self, model: str | None) -> bool:
        """None (the field left out) means the served model, as in vLLM."""
        return model is None or model in self.aliases
