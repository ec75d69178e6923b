"""python -m kvmesh.services.router"""

from __future__ import annotations

import argparse

from kvmesh.libs.service import add_common_args, env_default, serve_on_bus, setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="kvmesh-router")
    add_common_args(parser)
    parser.add_argument(
        "--scorer",
        default=env_default("KVMESH_ROUTER_SCORER", "kv"),
        choices=["kv", "load", "round-robin", "random"],
        help="routing policy: kv (prefix overlap vs load, session affinity), load, or the baselines",
    )
    args = parser.parse_args()
    setup_logging("router", args.log_level)
    from kvmesh.libs.metrics import model_label
    from kvmesh.libs.tracing import setup_tracing
    from kvmesh.services.router.scoring import make_scorer
    from kvmesh.services.router.service import RouterConfig, RouterService

    setup_tracing("router")
    config = RouterConfig(nats_url=args.nats_url, model_name=model_label(args.model))
    service = RouterService(config, make_scorer(args.scorer))
    serve_on_bus(args.nats_url, "router", service.attach, args.metrics_port, args.metrics_host)


if __name__ == "__main__":
    main()
