"""Gateway configuration: flags with environment fallbacks, parsed once; and the served model's card."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from kvmesh.libs.service import add_common_args, env_default


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "SmolLM2-135M-Instruct"  # packaged model name or HF folder (for the tokenizer and context)
    served_model_name: str | None = None  # None: the model's name (its folder name for a path)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    request_timeout: float = 600.0  # seconds from arrival to the last token
    token_timeout: float = 120.0  # longest silence between tokens (or before the first) on a stream
    bus_timeout: float = 10.0  # one NATS request to the tokenizer, router or a worker
    log_level: str = "INFO"

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> GatewayConfig:
        d = cls()  # the defaults (a slots dataclass has no class-level field values)
        p = argparse.ArgumentParser(prog="kvmesh-gateway", description="kvmesh OpenAI-compatible gateway")
        add_common_args(p)  # --nats-url, --model, --log-level
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
        p.add_argument(
            "--request-timeout",
            type=float,
            default=env_default("KVMESH_GATEWAY_REQUEST_TIMEOUT", d.request_timeout),
        )
        p.add_argument(
            "--token-timeout",
            type=float,
            default=env_default("KVMESH_GATEWAY_TOKEN_TIMEOUT", d.token_timeout),
        )
        p.add_argument(
            "--bus-timeout", type=float, default=env_default("KVMESH_GATEWAY_BUS_TIMEOUT", d.bus_timeout)
        )
        a = p.parse_args(argv)
        for name in ("request_timeout", "token_timeout", "bus_timeout"):
            if getattr(a, name) <= 0:
                p.error(f"--{name.replace('_', '-')} must be > 0")
        return cls(
            nats_url=a.nats_url,
            host=a.host,
            port=a.port,
            model=a.model,
            served_model_name=a.served_model_name or None,
            max_model_len=a.max_model_len or None,
            request_timeout=a.request_timeout,
            token_timeout=a.token_timeout,
            bus_timeout=a.bus_timeout,
            log_level=a.log_level,
        )


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
