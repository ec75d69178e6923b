"""What every service process shares: logging, config from flags with env fallbacks, the run loop
(uvloop, SIGTERM/SIGINT -> graceful stop), the metrics/health endpoint (libs/metrics_server.py).

A simple service's `main` is `start_service` (flags, logging, threads, tracing), building its
service object, then `serve_on_bus` (connect, attach, serve until SIGTERM, close, drain)."""

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


def add_common_args(parser: argparse.ArgumentParser, metrics_port: bool = True) -> None:
    """`metrics_port=False` for a service that serves /metrics on its own HTTP port (the gateway)."""
    parser.add_argument("--nats-url", default=env_default("KVMESH_NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument("--model", default=env_default("KVMESH_MODEL", "SmolLM2-135M-Instruct"))
    parser.add_argument("--log-level", default=env_default("KVMESH_LOG_LEVEL", "INFO"))
    if metrics_port:
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=env_default("KVMESH_METRICS_PORT", 0),
            help="serve GET /metrics and /health on this port (0: off)",
        )
        parser.add_argument("--metrics-host", default=env_default("KVMESH_METRICS_HOST", "0.0.0.0"))


def add_flag(
    parser: argparse.ArgumentParser, flag: str, env: str, default: Any, help: str | None = None
) -> None:
    """`--flag` with the environment variable `env` as its fallback, typed like `default`."""
    typed = default is not None and not isinstance(default, bool | str)
    kwargs = {"type": type(default)} if typed else {}
    parser.add_argument(flag, default=env_default(env, default), help=help, **kwargs)


def start_service(
    name: str,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    threads: int | None = None,
) -> argparse.Namespace:
    """The start of a service's main: parse its flags (the common ones, then `add_args`'), set up
    logging, the thread count (`threads`, before anything imports torch; None: untouched) and
    tracing. Returns the flags."""
    parser = argparse.ArgumentParser(prog=f"kvmesh-{name}")
    add_common_args(parser)
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args()
    setup_logging(name, args.log_level)
    if threads is not None:
        from kvmesh.libs.threads import configure_threads

        configure_threads(threads)
    from kvmesh.libs.tracing import setup_tracing

    setup_tracing(name)
    return args


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


def serve_on_bus(
    args: argparse.Namespace,
    name: str,
    attach: Callable[[Any], Awaitable[None]],
    close: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """The whole life of a simple service: start its metrics endpoint (`args.metrics_port`, unless
    0), connect to `args.nats_url`, `attach(bus)` its handlers (from then on /health answers 200),
    serve until SIGTERM, `close()` it, then drain."""

    async def main(stop: asyncio.Event) -> None:
        from kvmesh.libs.bus import Bus
        from kvmesh.libs.metrics_server import start_metrics_server

        metrics = await start_metrics_server(args.metrics_port, args.metrics_host)
        bus = await Bus.connect(args.nats_url, name)
        await attach(bus)
        if metrics is not None:
            metrics.attached(bus)
        await stop.wait()
        if close is not None:
            await close()
        await bus.close()
        if metrics is not None:
            await metrics.close()

    run(main)
