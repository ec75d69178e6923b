"""python -m kvmesh.services.router"""

from __future__ import annotations

import argparse

from kvmesh.libs.service import add_common_args, serve_on_bus, setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="kvmesh-router")
    add_common_args(parser)
    args = parser.parse_args()
    setup_logging("router", args.log_level)
    from kvmesh.services.router.service import RouterConfig, RouterService

    service = RouterService(RouterConfig(nats_url=args.nats_url))
    serve_on_bus(args.nats_url, "router", service.attach)


if __name__ == "__main__":
    main()
