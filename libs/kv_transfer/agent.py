"""A worker's NIXL agent over its whole KV cache: register once, pull blocks from peers with READ.

The cache is block-major (`[blocks, layers, 2, kv_heads, block_size, head_dim]`), so block i of
every layer is one contiguous range: the descriptor list of a cache is one descriptor per block,
prepared once (locally at start, per peer when the peer is first seen) and a pull names blocks by
index. On GPUs the same code registers VRAM; on these machines it moves host memory through UCX
(CMA between processes on one host).

Threading: every NIXL call runs on one dedicated thread (the agent is created without thread
synchronisation and without UCX's progress thread, which busy-spins). Completion is polled there,
so the event loop never blocks on a transfer. The passive side of a READ must keep progressing
its UCX worker: `poll_notifs()` does that while a worker has blocks leased out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from kvmesh.schemas.transfer import KVLayout, NixlInfo

log = logging.getLogger(__name__)


class TransferError(RuntimeError):
    """A NIXL transfer failed, timed out, or the peer's cache is not compatible with ours."""


class TransferResult(NamedTuple):
    num_blocks: int
    num_bytes: int
    seconds: float


def kv_layout(kv_cache: torch.Tensor, model: str) -> KVLayout:
    if not kv_cache.is_contiguous():
        raise ValueError("the KV cache must be one contiguous block-major tensor")
    block_bytes = kv_cache[0].numel() * kv_cache.element_size()
    return KVLayout(
        model=model,
        dtype=str(kv_cache.dtype).removeprefix("torch."),
        block_size=kv_cache.shape[-2],
        block_shape=list(kv_cache.shape[1:]),
        block_bytes=block_bytes,
    )


@dataclass(slots=True)
class _Peer:
    info: NixlInfo
    dlist: object  # nixl_prepped_dlist_handle of the peer's blocks


class KVTransferAgent:
    def __init__(self, worker_id: str, kv_cache: torch.Tensor, model: str, backend: str = "UCX") -> None:
        os.environ.setdefault("UCX_NET_DEVICES", "lo")  # local runs: loopback only (set it for clusters)
        self.layout = kv_layout(kv_cache, model)
        self.kv_cache = kv_cache
        self.num_blocks = kv_cache.shape[0]
        self.mem_type = "DRAM" if kv_cache.device.type == "cpu" else "VRAM"
        self.device_id = kv_cache.device.index or 0
        self.agent_name = f"{worker_id}-{uuid.uuid4().hex[:8]}"  # new per start: peers see restarts
        self.backend = backend
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmesh-nixl")
        self._peers: dict[str, _Peer] = {}  # agent name -> prepared peer
        self._agent = None
        self._local = None
        self._reg = None
        self.blocks_pulled = 0
        self.bytes_pulled = 0

    # -- setup ------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._run(self._start)

    def _start(self) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        conf = nixl_agent_config(enable_prog_thread=False, backends=[self.backend])
        self._agent = nixl_agent(self.agent_name, conf)
        self._reg = self._agent.register_memory(self.kv_cache)
        self._local = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", self._block_descs(), self.mem_type)
        log.info(
            "NIXL agent %s: %d blocks of %d bytes registered (%s)",
            self.agent_name,
            self.num_blocks,
            self.layout.block_bytes,
            self.mem_type,
        )

    def _block_descs(self, base: int | None = None, num_blocks: int | None = None) -> np.ndarray:
        base = self.kv_cache.data_ptr() if base is None else base
        n = self.num_blocks if num_blocks is None else num_blocks
        bb = self.layout.block_bytes
        descs = np.empty((n, 3), dtype=np.int64)
        descs[:, 0] = base + bb * np.arange(n, dtype=np.int64)
        descs[:, 1] = bb
        descs[:, 2] = self.device_id
        return descs

    def info(self) -> NixlInfo:
        assert self._agent is not None, "start() first"
        return NixlInfo(
            agent_name=self.agent_name,
            metadata=self._agent.get_agent_metadata(),
            base_addr=self.kv_cache.data_ptr(),
            num_blocks=self.num_blocks,
            mem_type=self.mem_type,
            device_id=self.device_id,
            layout=self.layout,
        )

    def knows(self, agent_name: str) -> bool:
        return agent_name in self._peers

    async def add_peer(self, info: NixlInfo) -> None:
        """Connect to a peer (once per peer start). Refuses a peer whose blocks differ from ours."""
        if info.layout != self.layout:
            raise TransferError(f"peer {info.agent_name} has KV layout {info.layout}, ours is {self.layout}")
        if info.agent_name not in self._peers:
            await self._run(self._add_peer, info)

    def _add_peer(self, info: NixlInfo) -> None:
        name = self._agent.add_remote_agent(info.metadata)
        name = name.decode() if isinstance(name, bytes) else name
        descs = self._block_descs(info.base_addr, info.num_blocks)
        dlist = self._agent.prep_xfer_dlist(name, descs, info.mem_type)
        self._peers[info.agent_name] = _Peer(info, dlist)

    async def forget_peer(self, agent_name: str) -> None:
        """Drop a peer that restarted or died (its metadata is stale)."""
        if agent_name in self._peers:
            await self._run(self._forget_peer, agent_name)

    def _forget_peer(self, agent_name: str) -> None:
        peer = self._peers.pop(agent_name, None)
        if peer is None:
            return
        try:
            self._agent.release_dlist_handle(peer.dlist)
            self._agent.remove_remote_agent(agent_name)
        except Exception as exc:  # the peer may be gone already: nothing to clean on its side
            log.debug("forgetting NIXL peer %s: %r", agent_name, exc)

    # -- transfers ----------------------------------------------------------------------------------
    async def pull(
        self, agent_name: str, remote_blocks: list[int], local_blocks: list[int], timeout_s: float = 10.0
    ) -> TransferResult:
        """READ the peer's blocks into ours, block i -> local_blocks[i]. Raises TransferError."""
        if len(remote_blocks) != len(local_blocks):
            raise ValueError("remote and local block lists differ in length")
        peer = self._peers.get(agent_name)
        if peer is None:
            raise TransferError(f"unknown NIXL peer {agent_name}")
        if not remote_blocks:
            return TransferResult(0, 0, 0.0)
        if max(remote_blocks) >= peer.info.num_blocks or max(local_blocks) >= self.num_blocks:
            raise TransferError("block id out of range")
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._thread, self._pull, peer, remote_blocks, local_blocks, timeout_s)
        try:
            result = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The READ keeps writing into our blocks until it completes: the caller may only hand
            # them back once it has, or another request could be given blocks still being written.
            with contextlib.suppress(Exception):
                await fut
            raise
        self.blocks_pulled += result.num_blocks
        self.bytes_pulled += result.num_bytes
        return result

    def _pull(
        self, peer: _Peer, remote_blocks: list[int], local_blocks: list[int], timeout_s: float
    ) -> TransferResult:
        t0 = time.perf_counter()
        handle = self._agent.make_prepped_xfer(
            "READ",
            self._local,
            np.asarray(local_blocks, dtype=np.int32),
            peer.dlist,
            np.asarray(remote_blocks, dtype=np.int32),
        )
        try:
            state = self._agent.transfer(handle)
            deadline = t0 + timeout_s
            while state == "PROC":
                if time.perf_counter() > deadline:
                    raise TransferError(f"pull of {len(local_blocks)} blocks timed out after {timeout_s}s")
                time.sleep(0.0002)
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransferError(f"NIXL transfer state {state}")
        finally:
            self._agent.release_xfer_handle(handle)
        n = len(local_blocks)
        return TransferResult(n, n * self.layout.block_bytes, time.perf_counter() - t0)

    async def poll_notifs(self) -> dict[str, list[bytes]]:
        """Progress this agent as the passive side of peers' READs (and collect notifications)."""
        return await self._run(self._agent.get_new_notifs)

    # -- plumbing -----------------------------------------------------------------------------------
    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def close(self) -> None:
        def _close() -> None:
            for name in list(self._peers):
                self._forget_peer(name)
            if self._agent is not None and self._reg is not None:
                try:
                    self._agent.release_dlist_handle(self._local)
                    self._agent.deregister_memory(self._reg)
                except Exception as exc:
                    log.debug("NIXL cleanup: %r", exc)

        self._thread.submit(_close).result(timeout=10)
        self._thread.shutdown(wait=True)
