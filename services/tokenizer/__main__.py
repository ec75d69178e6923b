"""python -m kvmesh.services.tokenizer"""

from __future__ import annotations

import argparse

from kvmesh.libs.service import add_flag, serve_on_bus, start_service


def add_args(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--block-size",
        "KVMESH_BLOCK_SIZE",
        0,
        "hash in blocks of this size (0: the workers', from their heartbeats; 16 until one is heard)",
    )
    add_flag(
        parser,
        "--chat-template",
        "KVMESH_CHAT_TEMPLATE",
        None,
        "a Jinja chat template file (or the template itself) that replaces the model's",
    )


def main() -> None:
    args = start_service("tokenizer", add_args, threads=1)
    from kvmesh.libs.engine.model_store import resolve_model
    from kvmesh.services.tokenizer.service import TokenizerConfig, TokenizerService

    config = TokenizerConfig(
        nats_url=args.nats_url,
        model=args.model,
        block_size=args.block_size,
        chat_template=args.chat_template or None,
    )
    service = TokenizerService(config, resolve_model(config.model))
    serve_on_bus(args, "tokenizer", service.attach)


if __name__ == "__main__":
    main()
