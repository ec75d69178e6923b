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
        default=env_default("KVMESH_ROUTER_INDEX", "kv-index"),
        choices=["kv-index", "redis"],
        help="where prefix overlaps come from: the kv-index service over NATS, or its Redis directly "
        "(--redis-url / KVMESH_REDIS_URL; one hop less per decision)",
    )
    add_flag(parser, "--redis-url", "KVMESH_REDIS_URL", "redis://127.0.0.1:6379")


def main() -> None:
    args = start_service("router", add_args)
    from kvmesh.libs.metrics import model_label
    from kvmesh.services.router.scoring import make_scorer
    from kvmesh.services.router.service import RouterConfig, RouterService

    config = RouterConfig(
        nats_url=args.nats_url,
        model_name=model_label(args.model),
        disagg_min_tokens=args.disagg_min_tokens,
        disagg_max_queue_tokens=args.disagg_max_queue_tokens,
        index_redis_url=args.redis_url if args.index == "redis" else None,
    )
    service = RouterService(config, make_scorer(args.scorer))
    serve_on_bus(args, "router", service.attach)


if __name__ == "__main__":
    main()
