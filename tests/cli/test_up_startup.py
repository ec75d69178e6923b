"""`kvmesh up` refusing to start wrongly: a requested port that is busy is an error (exit 2), and a process
that cannot start ends it (exit 1) naming the process, its last exit and its log, after a few tries; the
gateway meanwhile is alive (`/health` 200) but not ready (`/ready` 503: no worker)."""

from __future__ import annotations

import socket
import time

import httpx
from kvmesh_up import KvmeshUp

HANG_GUARD_S = 240.0


def test_a_requested_busy_port_exits_2_with_a_message(tiny_chat_model_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, env in (([f"--port={port}"], {}), ([], {"KVMESH_PORT": str(port)})):
            with KvmeshUp([*args, "--model", str(tiny_chat_model_path)], env=env) as up:
                assert up.popen.wait(60) == 2, up.output()
                up.wait_for(rf"kvmesh: port {port} is already in use", 5)


def test_a_worker_that_cannot_start_ends_kvmesh_up_with_exit_1(tiny_chat_model_path, tmp_path):
    # Only the worker reads KVMESH_MAX_WAITING: reading it as its flag's default fails (exit code 1).
    env = {"KVMESH_MAX_WAITING": "not-a-number"}
    args = ["--port", "0", "--model", str(tiny_chat_model_path), "--log-dir", str(tmp_path)]
    with KvmeshUp(args, env=env) as up:
        port = int(up.wait_for(r"serving on free port (?P<port>\d+)", 30)["port"])
        base = f"http://127.0.0.1:{port}"
        # While the worker keeps failing, the gateway lives (/health) but cannot serve (/ready).
        ready = None
        deadline = time.monotonic() + HANG_GUARD_S
        while ready is None and up.popen.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    ready = httpx.get(f"{base}/ready", timeout=5)
            except httpx.TransportError:  # not listening yet
                time.sleep(0.2)  # a bounded poll for the port to open
        assert ready is not None, f"the gateway never answered /health\n{up.output()}"
        assert ready.status_code == 503, ready.text
        assert ready.json()["error"]["code"] == "not_ready"
        assert up.popen.wait(HANG_GUARD_S) == 1, up.output()
        line = up.wait_for(r"kvmesh: worker-0 cannot start", 5).string
        assert "5 times in a row" in line and "last: exit code 1" in line, line
        assert str(tmp_path / "worker-0.log") in line, line
        assert "not-a-number" in (tmp_path / "worker-0.log").read_text()
        assert up.wait_for(r"kvmesh: worker-0 restarting in 4 s \(restart 4\)", 5)
