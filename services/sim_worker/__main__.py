"""python -m kvmesh.services.sim_worker --count N"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket

from kvmesh.libs.kv_contract import DEFAULT_BLOCK_SIZE
from kvmesh.libs.service import add_common_args, env_default, run, setup_logging
from kvmesh.libs.threads import configure_threads


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="kvmesh-sim-worker",
        description="N simulated workers in one process: the worker's NATS protocol, heartbeats and KV "
        "events, a real prefix cache and scheduler, a calibrated timing model instead of the model.",
    )
    add_common_args(parser)
    parser.add_argument("--count", type=int, default=env_default("KVMESH_SIM_COUNT", 1))
    parser.add_argument(
        "--id-prefix",
        default=env_default("KVMESH_SIM_ID_PREFIX", None),
        help="worker ids are <prefix>-<i> (default: sim-<hostname>-<pid>)",
    )
    parser.add_argument(
        "--profile",
        default=env_default("KVMESH_SIM_PROFILE", None),
        help="timing profile JSON (default: the committed one, calibrated by loadtest/calibrate_sim.py)",
    )
    parser.add_argument(
        "--speedup",
        type=float,
        default=env_default("KVMESH_SIM_SPEEDUP", 1.0),
        help="divide every modelled duration by this (0.1: ten times slower than the real engine)",
    )
    parser.add_argument("--num-kv-blocks", type=int, default=env_default("KVMESH_NUM_KV_BLOCKS", 2048))
    parser.add_argument(
        "--block-size", type=int, default=env_default("KVMESH_BLOCK_SIZE", DEFAULT_BLOCK_SIZE)
    )
    parser.add_argument("--max-num-seqs", type=int, default=env_default("KVMESH_MAX_NUM_SEQS", 64))
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=env_default("KVMESH_MAX_BATCHED_TOKENS", 512)
    )
    parser.add_argument("--max-model-len", type=int, default=env_default("KVMESH_MAX_MODEL_LEN", 8192))
    parser.add_argument("--vocab-size", type=int, default=env_default("KVMESH_SIM_VOCAB_SIZE", 49152))
    parser.add_argument("--heartbeat-interval", type=float, default=env_default("KVMESH_HEARTBEAT_S", 1.0))
    parser.add_argument(
        "--kv-events-interval", type=float, default=env_default("KVMESH_KV_EVENTS_INTERVAL_S", 0.05)
    )
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=env_default("KVMESH_MAX_WAITING", 64),
        help="queued requests per worker beyond which generate answers 'overloaded' (0: unbounded)",
    )
    parser.add_argument("--workers-per-connection", type=int, default=64)
    parser.add_argument("--drain-timeout", type=float, default=env_default("KVMESH_DRAIN_TIMEOUT_S", 5.0))
    args = parser.parse_args()
    prefix = args.id_prefix or f"sim-{socket.gethostname()}-{os.getpid()}"
    setup_logging(f"sim-worker[{prefix} x{args.count}]", args.log_level)
    configure_threads(1)  # no model compute: torch is imported (engine types) but never runs
    from kvmesh.libs.metrics_server import start_metrics_server
    from kvmesh.services.sim_worker.core import SimEngineConfig
    from kvmesh.services.sim_worker.fleet import FleetConfig, SimFleet
    from kvmesh.services.sim_worker.timing import load_profile

    config = FleetConfig(
        nats_url=args.nats_url,
        count=args.count,
        id_prefix=prefix,
        engine=SimEngineConfig(
            model=args.model,
            block_size=args.block_size,
            num_kv_blocks=args.num_kv_blocks,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            vocab_size=args.vocab_size,
        ),
        profile=load_profile(args.profile),
        speedup=args.speedup,
        heartbeat_interval_s=args.heartbeat_interval,
        kv_events_interval_s=args.kv_events_interval,
        workers_per_connection=args.workers_per_connection,
        drain_timeout_s=args.drain_timeout,
        max_waiting=args.max_waiting,
    )

    async def serve(stop: asyncio.Event) -> None:
        metrics = await start_metrics_server(args.metrics_port, args.metrics_host)
        fleet = SimFleet(config)
        await fleet.start(stop)
        if metrics is not None:
            metrics.attached(fleet.buses[0])
        reporter = asyncio.create_task(fleet.report_loop(stop))
        await stop.wait()
        await reporter
        await fleet.close()
        logging.getLogger("kvmesh.sim_worker").info("stopped: %s", fleet.report())
        if metrics is not None:
            await metrics.close()

    run(serve)


if __name__ == "__main__":
    main()
