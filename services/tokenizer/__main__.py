"""python -m kvmesh.services.tokenizer"""

from __future__ import annotations

import argparse

from kvmesh.libs.service import add_common_args, env_default, serve_on_bus, setup_logging
from kvmesh.libs.threads import configure_threads


def main() -> None:
    parser = argparse.ArgumentParser(prog="kvmesh-tokenizer")
    add_common_args(parser)
    parser.add_argument("--block-size", type=int, default=env_default("KVMESH_BLOCK_SIZE", 16))
    args = parser.parse_args()
    setup_logging("tokenizer", args.log_level)
    configure_threads(1)
    from kvmesh.libs.tracing import setup_tracing

    setup_tracing("tokenizer")
    from kvmesh.libs.engine.model_store import resolve_model
    from kvmesh.services.tokenizer.service import TokenizerConfig, TokenizerService

    config = TokenizerConfig(nats_url=args.nats_url, model=args.model, block_size=args.block_size)
    service = TokenizerService(config, resolve_model(config.model))

    serve_on_bus(config.nats_url, "tokenizer", service.attach, args.metrics_port, args.metrics_host)


if __name__ == "__main__":
    main()
