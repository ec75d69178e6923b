"""python -m kvmesh.services.gateway"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

from kvmesh.libs.service import setup_logging
from kvmesh.libs.threads import configure_threads
from kvmesh.services.gateway.config import GatewayConfig

log = logging.getLogger("kvmesh.services.gateway")


def main(argv: list[str] | None = None) -> None:
    config = GatewayConfig.from_args(argv)
    configure_threads(1)  # before anything imports torch; the gateway computes nothing heavy
    setup_logging("gateway", config.log_level)
    from kvmesh.libs.tracing import setup_tracing

    setup_tracing("gateway")
    import uvicorn
    from tokenizers import Tokenizer

    from kvmesh.libs.bus import Bus
    from kvmesh.libs.engine.model_store import resolve_model
    from kvmesh.services.gateway.app import create_app
    from kvmesh.services.gateway.config import ServedModel

    path = resolve_model(config.model)
    model = ServedModel.load(config, path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))

    try:
        import uvloop
    except ImportError:
        uvloop = None

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn would re-raise SIGTERM after its shutdown, killing the process before NATS
            # drains; serve() below routes the signals to handle_exit itself.
            yield

    async def serve() -> None:
        bus = await Bus.connect(config.nats_url, "gateway")
        app = create_app(config, bus, tokenizer, model)
        await app.state.readiness.start()  # /ready knows the workers from the first probe on
        await app.state.generator.watch_workers()  # flow control knows their room before a request
        server = Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                loop="uvloop" if uvloop else "asyncio",
                access_log=False,
                log_level=config.log_level.lower(),
                timeout_graceful_shutdown=10,
            )
        )
        log.info(
            "serving %s (context %d) on http://%s:%d",
            model.name,
            model.max_model_len,
            config.host,
            config.port,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.handle_exit, sig, None)
        try:
            await server.serve()  # returns on SIGINT/SIGTERM after a graceful shutdown
        finally:
            await bus.close()

    # uvicorn's `loop` only applies when it owns the loop; we own it to connect NATS first.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
        runner.run(serve())


if __name__ == "__main__":
    main()
