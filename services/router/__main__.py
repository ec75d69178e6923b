"""python -m kvmesh.services.router"""

from __future__ import annotations

import argparse
import asyncio

from kvmesh.libs.service import add_common_args, run, setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="kvmesh-router")
    add_common_args(parser)
    args = parser.parse_args()
    setup_logging("router", args.log_level)
    from kvmesh.libs.bus import Bus
    from kvmesh.services.router.service import RouterConfig, RouterService

    service = RouterService(RouterConfig(nats_url=args.nats_url))

    async def serve(stop: asyncio.Event) -> None:
        bus = await Bus.connect(args.nats_url, "router")
        await service.attach(bus)
        await stop.wait()
        await bus.close()

    run(serve)


if __name__ == "__main__":
    main()
