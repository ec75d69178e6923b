"""python -m kvmesh.services.kv_index"""

from __future__ import annotations

import argparse
import asyncio

from kvmesh.libs.service import add_common_args, env_default, run, setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="kvmesh-kv-index")
    add_common_args(parser)
    parser.add_argument("--redis-url", default=env_default("KVMESH_REDIS_URL", "redis://127.0.0.1:6379"))
    args = parser.parse_args()
    setup_logging("kv-index", args.log_level)
    from kvmesh.libs.bus import Bus
    from kvmesh.libs.credentials import redis_client
    from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_seed
    from kvmesh.libs.engine.model_store import resolve_model
    from kvmesh.libs.metrics_server import start_metrics_server
    from kvmesh.libs.tracing import setup_tracing
    from kvmesh.services.kv_index.index import KVIndex
    from kvmesh.services.kv_index.service import KVIndexService

    extra = encode_extra_keys(resolve_model(args.model).name)  # the namespace the tokenizer hashes in
    setup_tracing("kv-index")

    async def serve(stop: asyncio.Event) -> None:
        metrics = await start_metrics_server(args.metrics_port, args.metrics_host)
        redis = redis_client(args.redis_url)  # credentials and TLS: KVMESH_REDIS_*
        service = KVIndexService(KVIndex(redis, extra, hash_seed(None)))
        bus = await Bus.connect(args.nats_url, "kv-index")
        await service.attach(bus)
        if metrics is not None:
            metrics.attached(bus)
        expiry = asyncio.create_task(service.expiry_loop(stop))
        await stop.wait()
        await expiry
        await bus.close()
        await redis.aclose()
        if metrics is not None:
            await metrics.close()

    run(serve)


if __name__ == "__main__":
    main()
