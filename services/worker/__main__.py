"""python -m kvmesh.services.worker"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import uuid

from kvmesh.libs.allocator_env import engine_allocator_env
from kvmesh.libs.kv_contract import DEFAULT_BLOCK_SIZE
from kvmesh.libs.service import add_common_args, env_default, run, setup_logging
from kvmesh.libs.threads import configure_threads


def main() -> None:
    parser = argparse.ArgumentParser(prog="kvmesh-worker")
    add_common_args(parser)
    parser.add_argument("--worker-id", default=env_default("KVMESH_WORKER_ID", None))
    parser.add_argument("--dtype", default=env_default("KVMESH_DTYPE", "auto"))
    parser.add_argument("--kv-cache-gb", type=float, default=env_default("KVMESH_KV_CACHE_GB", 1.0))
    parser.add_argument("--num-kv-blocks", type=int, default=env_default("KVMESH_NUM_KV_BLOCKS", 0))
    parser.add_argument(
        "--block-size",
        type=int,
        default=env_default("KVMESH_BLOCK_SIZE", DEFAULT_BLOCK_SIZE),
        help="tokens per KV block: published in the worker's KV contract, the rest of the mesh follows",
    )
    parser.add_argument("--max-num-seqs", type=int, default=env_default("KVMESH_MAX_NUM_SEQS", 64))
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=env_default("KVMESH_MAX_BATCHED_TOKENS", 512)
    )
    parser.add_argument("--max-model-len", type=int, default=env_default("KVMESH_MAX_MODEL_LEN", 0))
    parser.add_argument("--threads", type=int, default=env_default("KVMESH_THREADS", 0))
    parser.add_argument("--drain-timeout", type=float, default=env_default("KVMESH_DRAIN_TIMEOUT_S", 30.0))
    parser.add_argument("--heartbeat-interval", type=float, default=env_default("KVMESH_HEARTBEAT_S", 1.0))
    parser.add_argument(
        "--kv-events-interval",
        type=float,
        default=env_default("KVMESH_KV_EVENTS_INTERVAL_S", 0.05),
        help="seconds between two batches of KV cache events (index freshness vs wake-ups of the indexes)",
    )
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=env_default("KVMESH_MAX_WAITING", 64),
        help="accepted requests waiting to run; beyond, new ones are refused as overloaded (0: no bound)",
    )
    parser.add_argument(
        "--role",
        choices=("aggregated", "prefill", "decode"),
        default=env_default("KVMESH_WORKER_ROLE", "aggregated"),
        help="prefill: computes prompts' KV for decode workers to pull; decode/aggregated: serve requests",
    )
    parser.add_argument(
        "--nixl",
        action=argparse.BooleanOptionalAction,
        default=env_default("KVMESH_NIXL", "1") not in ("0", "false", "no"),
        help="own a NIXL agent over the KV cache (needed for disaggregated prefill)",
    )
    parser.add_argument("--lease-s", type=float, default=env_default("KVMESH_LEASE_S", 30.0))
    parser.add_argument(
        "--prefill-timeout", type=float, default=env_default("KVMESH_PREFILL_TIMEOUT_S", 120.0)
    )
    args = parser.parse_args()
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    setup_logging(f"worker[{worker_id}]", args.log_level)
    engine_allocator_env()  # before torch loads (configure_threads imports it)
    configure_threads(args.threads or None)
    from kvmesh.libs.bus import Bus
    from kvmesh.libs.engine.async_engine import AsyncLLM
    from kvmesh.libs.engine.config import EngineConfig
    from kvmesh.libs.engine.engine import LLMEngine
    from kvmesh.libs.metrics_server import start_metrics_server
    from kvmesh.libs.tracing import setup_tracing
    from kvmesh.services.worker.disagg import DisaggConfig
    from kvmesh.services.worker.kv_events import KVEventPublisher
    from kvmesh.services.worker.service import WorkerConfig, WorkerService

    engine_config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_memory_gb=args.kv_cache_gb,
        num_kv_blocks=args.num_kv_blocks or None,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len or None,
    )
    config = WorkerConfig(
        nats_url=args.nats_url,
        worker_id=worker_id,
        model=args.model,
        role=args.role,
        heartbeat_interval_s=args.heartbeat_interval,
        max_waiting=args.max_waiting,
    )

    setup_tracing("worker", worker_id)

    async def serve(stop: asyncio.Event) -> None:
        metrics = await start_metrics_server(args.metrics_port, args.metrics_host)  # 503 until attached
        # The engine is built inside its own thread: see async_engine.py on OpenMP thread counts.
        llm = AsyncLLM(lambda: LLMEngine(engine_config, load_tokenizer=False))
        engine = await llm.ready()
        agent = await _start_agent(worker_id, engine) if args.nixl else None
        if agent is None and args.role == "prefill":
            raise SystemExit("a prefill worker needs its NIXL agent")
        disagg = DisaggConfig(lease_s=args.lease_s, prefill_timeout_s=args.prefill_timeout)
        service = WorkerService(config, llm, agent, disagg)
        bus = await Bus.connect(config.nats_url, f"worker-{worker_id}")
        await service.attach(bus)
        events = KVEventPublisher(
            bus, worker_id, llm.take_kv_events, args.kv_events_interval, engine.kv_contract
        )
        await events.start()
        if metrics is not None:
            metrics.attached(bus)
        tasks = [asyncio.create_task(service.heartbeat_loop(stop)), asyncio.create_task(events.run(stop))]
        await stop.wait()
        aborted = await service.drain(args.drain_timeout)
        if aborted:
            logging.getLogger("kvmesh.worker").warning("drain timed out: aborted %d requests", aborted)
        await asyncio.gather(*tasks)
        await bus.close()
        llm.shutdown()
        if agent is not None:
            agent.close()
        if metrics is not None:
            await metrics.close()

    run(serve)


async def _start_agent(worker_id: str, engine):
    """The worker's NIXL agent over its whole KV cache, or None (logged) when NIXL cannot start."""
    from kvmesh.libs.kv_transfer.agent import KVTransferAgent

    try:
        agent = KVTransferAgent(worker_id, engine.kv_cache, engine.model_path.name)
        await agent.start()
    except Exception as exc:
        logging.getLogger("kvmesh.worker").warning("NIXL unavailable (%r): no disaggregated prefill", exc)
        return None
    return agent


if __name__ == "__main__":
    main()
