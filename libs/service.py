"""What every service process shares: logging, config from flags with env fallbacks, the run loop
(uvloop, SIGTERM/SIGINT -> graceful stop)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any


def env_default(name: str, default: Any) -> Any:
    """A flag's default: the environment variable if set (converted to the default's type)."""
    raw = os.environ.get(name)
    if raw is None or default is None:
        return raw if raw is not None else default
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    return type(default)(raw)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-url", default=env_default("KVMESH_NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument("--model", default=env_default("KVMESH_MODEL", "SmolLM2-135M-Instruct"))
    parser.add_argument("--log-level", default=env_default("KVMESH_LOG_LEVEL", "INFO"))


def setup_logging(service: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)` on uvloop; SIGTERM and SIGINT set `stop` so main can drain and return."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(wrapper())


def serve_on_bus(nats_url: str, name: str, attach: Callable[[Any], Awaitable[None]]) -> None:
    """The whole life of a simple service: connect, `attach(bus)` its handlers, serve until SIGTERM,
    then drain."""

    async def main(stop: asyncio.Event) -> None:
        from kvmesh.libs.bus import Bus

        bus = await Bus.connect(nats_url, name)
        await attach(bus)
        await stop.wait()
        await bus.close()

    run(main)
