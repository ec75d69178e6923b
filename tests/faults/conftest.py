"""A real mesh to break: nats-server and redis-server (restartable on their ports), two workers, and two
replicas each of the tokenizer, router and kv-index, each its own process."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import httpx
import pytest
import redis

from kvmesh.libs.bus import Bus
from kvmesh.libs.launcher import Mesh, MeshConfig
from kvmesh.schemas.messages import (
    ChatMessage,
    EncodeRequest,
    EncodeResult,
    ErrorReply,
    OverlapReply,
    OverlapRequest,
    OverlapResult,
    RouterHealth,
    RouterHealthRequest,
    StatsRequest,
    Subjects,
    WorkerStats,
)
from kvmesh.services.kv_index.lease import LEASE

# The kv-index replicas' write lease: short, so that a killed leader is replaced within the test.
LEASE_S = "1.5"


@pytest.fixture(scope="package")
def infra():
    """Just nats-server (JetStream, a store dir) and redis-server, restartable on their ports, for the
    in-process tests. A test that kills one restarts it before it ends."""
    mesh = Mesh(MeshConfig())
    mesh.start_infra()
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="package")
def fault_mesh(default_model_path, tmp_path_factory) -> Mesh:
    config = MeshConfig(
        model=str(default_model_path),
        dtype="float32",
        num_workers=2,
        worker_args=["--kv-cache-gb", "0.1", "--heartbeat-interval", "0.5"],
        # a stream the bus lost must end within seconds, not the default two minutes
        # (a hung tokenizer or router replica costs a request one try: shorter than the default 1 s)
        gateway_args=[
            "--token-timeout",
            "10",
            "--bus-timeout",
            "5",
            "--tokenizer-try-timeout",
            "0.5",
            "--router-try-timeout",
            "0.5",
        ],
        log_dir=tmp_path_factory.mktemp("fault-mesh-logs"),
        tokenizer_replicas=2,
        router_replicas=2,
        kv_index_replicas=2,
    )
    saved = os.environ.get("KVMESH_KV_INDEX_LEASE_S")
    os.environ["KVMESH_KV_INDEX_LEASE_S"] = LEASE_S  # the children inherit it
    try:
        with Mesh(config) as mesh:
            mesh.wait_ready(timeout=180)
            yield mesh
    finally:
        if saved is None:
            os.environ.pop("KVMESH_KV_INDEX_LEASE_S", None)
        else:
            os.environ["KVMESH_KV_INDEX_LEASE_S"] = saved


class MeshProbe:
    """What the fault tests ask a running mesh: chat over HTTP, the tokenizer, the kv-index and the
    router over NATS (each question on its own short-lived connection), the write lease in Redis."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.http = httpx.Client(base_url=mesh.base_url, timeout=60)
        self.model = self.http.get("/v1/models").json()["data"][0]["id"]

    @staticmethod
    def conversation(tag: str) -> list[dict]:
        """A chat whose system prompt is several blocks long and unique to `tag` (cached nowhere yet)."""
        system = f"Session {tag}. " + " ".join(f"Rule {i} of {tag}: be brief." for i in range(12))
        return [{"role": "system", "content": system}, {"role": "user", "content": "Name a color."}]

    # -- HTTP ----------------------------------------------------------------------------------------
    def chat(self, messages: list[dict], max_tokens: int = 4) -> httpx.Response:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        return self.http.post("/v1/chat/completions", json=body)

    # -- NATS ----------------------------------------------------------------------------------------
    def ask(self, subject: str, msg, reply_type, timeout: float = 3.0):
        async def go():
            bus = await Bus.connect(self.mesh.nats_url, "fault-probe", connect_timeout=2)
            try:
                return await bus.request(subject, msg, reply_type, timeout=timeout)
            finally:
                await bus.close()

        return asyncio.run(go())

    def block_hashes(self, messages: list[dict]) -> list[int]:
        chat = [ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        reply = self.ask(
            Subjects.TOKENIZER_ENCODE, EncodeRequest(request_id="probe", messages=chat), EncodeResult
        )
        return reply.block_hashes

    def overlap(self, hashes: list[int]) -> OverlapReply | ErrorReply:
        return self.ask(Subjects.KV_INDEX_OVERLAP, OverlapRequest(block_hashes=hashes), OverlapResult)

    def indexed(self, hashes: list[int]) -> dict[str, int]:
        """worker -> leading blocks held, once the index reports any (events arrive asynchronously)."""
        found: dict[str, int] = {}

        def check() -> bool:
            reply = self.overlap(hashes)
            found.update(reply.overlap if isinstance(reply, OverlapReply) else {})
            return bool(found)

        self.until(check, "the kv-index reports the prompt's blocks")
        return found

    def router_health(self) -> RouterHealth:
        return self.ask(Subjects.ROUTER_HEALTH, RouterHealthRequest(), RouterHealth)

    def worker_stats(self, worker_id: str) -> WorkerStats:
        return self.ask(Subjects.worker(worker_id, "stats"), StatsRequest(), WorkerStats)

    def metric(self, process: str, name: str) -> float:
        """The value of an unlabelled metric on one process's /metrics."""
        text = httpx.get(self.mesh.metrics_urls[process], timeout=5).text
        values = [line.split()[-1] for line in text.splitlines() if line.split(" ")[0] == name]
        assert values, f"{process} exports no {name}"
        return float(values[0])

    # -- Redis ---------------------------------------------------------------------------------------
    def kv_index_leader(self) -> str | None:
        """The process name of the kv-index replica holding the write lease (its id is host-pid-...)."""
        r = redis.Redis.from_url(self.mesh.redis_url, socket_timeout=2)
        try:
            owner = r.get(LEASE)
        finally:
            r.close()
        if owner is None:
            return None
        pid = int(owner.decode().rsplit("-", 2)[1])
        return next((p.name for p in self.mesh.procs if p.popen.pid == pid), None)

    # -- waiting -------------------------------------------------------------------------------------
    def until(self, check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Poll `check` until true: a hang guard (the bound is generous), not a timing assertion."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except Exception as exc:  # a server is down or coming back
                last = exc
            time.sleep(0.1)
        raise AssertionError(f"never happened: {what} (last error: {last!r})")

    def wait_whole(self) -> None:
        """Every process up (restarted ones included), a kv-index leader, and a request served."""
        for p in self.mesh.procs:
            assert p.popen.poll() is None, f"{p.name} is not running"
        self.mesh.wait_healthy()  # every replica attached to NATS (a restarted one may still load)
        self.until(lambda: self.kv_index_leader() is not None, "a kv-index replica holds the write lease")
        self.until(lambda: self.chat([{"role": "user", "content": "Hi"}], 1).status_code == 200, "serving")


@pytest.fixture(scope="package")
def probe(fault_mesh) -> MeshProbe:
    p = MeshProbe(fault_mesh)
    yield p
    p.http.close()
