"""python -m kvmesh.services.kv_index"""

from __future__ import annotations

import argparse
import asyncio

from kvmesh.libs.service import add_common_args, env_default, run, setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="kvmesh-kv-index")
    add_common_args(parser)
    parser.add_argument("--redis-url", default=env_default("KVMESH_REDIS_URL", "redis://127.0.0.1:6379"))
    parser.add_argument(
        "--replica-id",
        default=env_default("KVMESH_KV_INDEX_REPLICA_ID", ""),
        help="this replica's name in the write lease (default: hostname-pid-random)",
    )
    parser.add_argument(
        "--lease-s",
        type=float,
        default=env_default("KVMESH_KV_INDEX_LEASE_S", 3.0),
        help="write-lease time: a dead leader is replaced after at most this long",
    )
    parser.add_argument(
        "--silent-worker-s",
        type=float,
        default=env_default("KVMESH_KV_INDEX_SILENT_WORKER_S", 10.0),
        help="a worker known only from its KV events is dropped after this long without a heartbeat",
    )
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
        # bounded waits: a hung Redis must fail the query (the router then routes by load), not stall it
        redis = redis_client(args.redis_url, socket_connect_timeout=2, socket_timeout=5)  # KVMESH_REDIS_*
        index = KVIndex(redis, extra, hash_seed(None))
        service = KVIndexService(index, args.replica_id, args.lease_s, args.silent_worker_s)
        bus = await Bus.connect(args.nats_url, "kv-index")
        await service.attach(bus)
        if metrics is not None:
            metrics.attached(bus)
        await stop.wait()
        await service.close()
        await bus.close()
        await redis.aclose()
        if metrics is not None:
            await metrics.close()

    run(serve)


if __name__ == "__main__":
    main()
