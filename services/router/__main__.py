"""python -m kvmesh.services.router"""

from __future__ import annotations

import argparse

from kvmesh.libs.service import add_flag, env_default, serve_on_bus, start_service


def add_args(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--disagg-min-tokens",
        "KVMESH_DISAGG_MIN_TOKENS",
        512,
        "prefill remotely only when at least this many prompt tokens are uncached on the decode worker",
    )
    add_flag(
        parser,
        "--disagg-max-queue-tokens",
        "KVMESH_DISAGG_MAX_QUEUE_TOKENS",
        16384,
        "a prefill worker with this many outstanding tokens is saturated: prefill locally instead",
    )
    parser.add_argument(
        "--scorer",
        default=env_default("KVMESH_ROUTER_SCORER", "kv"),
        choices=["kv", "load", "round-robin", "random"],
        help="routing policy: kv (prefix overlap vs load, session affinity), load, or the baselines",
    )
    parser.add_argument(
        "--index",
        default=env_default("KVMESH_ROUTER_INDEX", "local"),
        choices=["local", "kv-index", "redis"],
        help="where prefix overlaps come from: a replica of the index in this process fed by the KV "
        "event stream (no round trip per decision), the kv-index service over NATS, or its Redis "
        "directly (--redis-url / KVMESH_REDIS_URL)",
    )
    add_flag(parser, "--redis-url", "KVMESH_REDIS_URL", "redis://127.0.0.1:6379")
    add_flag(
        parser,
        "--silent-worker-s",
        "KVMESH_ROUTER_SILENT_WORKER_S",
        10.0,
        "--index local: a worker known only from its KV events leaves the replica after this long",
    )
    add_flag(
        parser,
        "--block-size",
        "KVMESH_BLOCK_SIZE",
        0,
        "the KV block size workers must have (0: the first worker's; workers publish theirs)",
    )
    add_flag(
        parser,
        "--warmup-s",
        "KVMESH_ROUTER_WARMUP_S",
        2.0,
        "listen to worker heartbeats this long before taking routes (a new router knows no worker yet)",
    )


def main() -> None:
    args = start_service("router", add_args)
    from kvmesh.libs.engine.block_hash import encode_extra_keys
    from kvmesh.libs.kv_contract import hash_namespace
    from kvmesh.libs.metrics import model_label
    from kvmesh.services.router.scoring import make_scorer
    from kvmesh.services.router.service import RouterConfig, RouterService

    config = RouterConfig(
        nats_url=args.nats_url,
        model_name=model_label(args.model),
        disagg_min_tokens=args.disagg_min_tokens,
        disagg_max_queue_tokens=args.disagg_max_queue_tokens,
        index=args.index,
        index_redis_url=args.redis_url if args.index == "redis" else None,
        # the namespace the tokenizer hashes in: the model's name (its folder's, for a path)
        index_extra_keys=encode_extra_keys(hash_namespace(args.model)),
        hash_namespace=hash_namespace(args.model),
        block_size=args.block_size,
        silent_worker_s=args.silent_worker_s,
        warmup_s=args.warmup_s,
    )
    service = RouterService(config, make_scorer(args.scorer))
    serve_on_bus(args, "router", service.attach, service.close)


if __name__ == "__main__":
    main()
