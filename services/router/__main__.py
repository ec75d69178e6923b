"""python -m kvmesh.services.router"""

from __future__ import annotations

import argparse

from kvmesh.libs.service import add_common_args, env_default, serve_on_bus, setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="kvmesh-router")
    add_common_args(parser)
    parser.add_argument(
        "--disagg-min-tokens",
        type=int,
        default=env_default("KVMESH_DISAGG_MIN_TOKENS", 512),
        help="prefill remotely only when at least this many prompt tokens are uncached on the decode worker",
    )
    parser.add_argument(
        "--disagg-max-queue-tokens",
        type=int,
        default=env_default("KVMESH_DISAGG_MAX_QUEUE_TOKENS", 16384),
        help="a prefill worker with this many outstanding tokens is saturated: prefill locally instead",
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
    parser.add_argument("--redis-url", default=env_default("KVMESH_REDIS_URL", "redis://127.0.0.1:6379"))
    args = parser.parse_args()
    setup_logging("router", args.log_level)
    from kvmesh.libs.metrics import model_label
    from kvmesh.libs.tracing import setup_tracing
    from kvmesh.services.router.scoring import make_scorer
    from kvmesh.services.router.service import RouterConfig, RouterService

    setup_tracing("router")
    config = RouterConfig(
        nats_url=args.nats_url,
        model_name=model_label(args.model),
        disagg_min_tokens=args.disagg_min_tokens,
        disagg_max_queue_tokens=args.disagg_max_queue_tokens,
        index_redis_url=args.redis_url if args.index == "redis" else None,
    )
    service = RouterService(config, make_scorer(args.scorer))
    serve_on_bus(args.nats_url, "router", service.attach, args.metrics_port, args.metrics_host)


if __name__ == "__main__":
    main()
