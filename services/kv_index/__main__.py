"""python -m kvmesh.services.kv_index"""

from __future__ import annotations

import argparse

from kvmesh.libs.service import add_flag, serve_on_bus, start_service


def add_args(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--redis-url", "KVMESH_REDIS_URL", "redis://127.0.0.1:6379")
    add_flag(
        parser,
        "--replica-id",
        "KVMESH_KV_INDEX_REPLICA_ID",
        "",
        "this replica's name in the write lease (default: hostname-pid-random)",
    )
    add_flag(
        parser,
        "--lease-s",
        "KVMESH_KV_INDEX_LEASE_S",
        3.0,
        "write-lease time: a dead leader is replaced after at most this long",
    )
    add_flag(
        parser,
        "--silent-worker-s",
        "KVMESH_KV_INDEX_SILENT_WORKER_S",
        10.0,
        "a worker known only from its KV events is dropped after this long without a heartbeat",
    )


def main() -> None:
    args = start_service("kv-index", add_args)
    from kvmesh.libs.credentials import redis_client
    from kvmesh.libs.engine.block_hash import encode_extra_keys
    from kvmesh.libs.kv_contract import ContractGate
    from kvmesh.services.kv_index.index import KVIndex
    from kvmesh.services.kv_index.service import KVIndexService

    # The KV contract the tokenizer hashes in: this model's namespace, KVMESH_HASH_SEED; the block
    # size is the workers' (a worker hashing otherwise is not indexed).
    gate = ContractGate.for_model(args.model)
    extra = encode_extra_keys(gate.namespace)
    # bounded waits: a hung Redis must fail the query (the router then routes by load), not stall it
    redis = redis_client(args.redis_url, socket_connect_timeout=2, socket_timeout=5)  # KVMESH_REDIS_*
    service = KVIndexService(
        KVIndex(redis, extra, gate.seed), args.replica_id, args.lease_s, args.silent_worker_s, gate
    )

    async def close() -> None:
        await service.close()
        await redis.aclose()

    serve_on_bus(args, "kv-index", service.attach, close)


if __name__ == "__main__":
    main()
