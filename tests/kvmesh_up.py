"""`kvmesh up` as a user runs it: the console script in a subprocess, read by its own output lines."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = re.compile(r"kvmesh: ready\. OpenAI API at (?P<url>http://\S+)/v1")


def kvmesh_script() -> str:
    """The `kvmesh` console script installed beside this Python (what the README's command runs)."""
    script = Path(sys.executable).parent / "kvmesh"
    return str(script) if script.is_file() else shutil.which("kvmesh") or "kvmesh"


class KvmeshUp:
    """`kvmesh up ARGS` in its own process group, its output (stdout and stderr, merged) collected
    line by line; `stop()` sends SIGINT, as Ctrl-C does."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self.popen = subprocess.Popen(
            [kvmesh_script(), "up", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.base_url = ""

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)

    def wait_for(self, pattern: str | re.Pattern, timeout: float) -> re.Match:
        """The first output line (seen so far or to come) matching `pattern`; fails with the output
        when the process exits first or `timeout` (a hang guard) passes."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if m := rx.search(line):
                    return m
            seen = len(self.lines)
            if self.popen.poll() is not None and self._new.empty() and seen == len(self.lines):
                raise AssertionError(f"kvmesh up exited ({self.popen.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matching {rx.pattern!r}:\n{self.output()}")
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=0.2)

    def wait_ready(self, timeout: float = 240.0) -> str:
        self.base_url = self.wait_for(READY, timeout)["url"]
        return self.base_url

    def nats_url(self, timeout: float = 5.0) -> str:
        return self.wait_for(r"; NATS (?P<url>nats://\S+)", timeout)["url"]

    def child_pid(self, *argv_parts: str, env: dict[str, str] | None = None) -> int:
        """The one process under `kvmesh up` whose command line holds `argv_parts` in a row (and whose
        environment has `env`, for replicas started with the same command line)."""
        import psutil

        found = []
        for child in psutil.Process(self.popen.pid).children(recursive=True):
            try:
                cmd, environ = child.cmdline(), child.environ() if env else {}
            except psutil.NoSuchProcess:
                continue
            n = len(argv_parts)
            if any(tuple(cmd[i : i + n]) == argv_parts for i in range(len(cmd))) and all(
                environ.get(k) == v for k, v in (env or {}).items()
            ):
                found.append(child.pid)
        assert len(found) == 1, f"{argv_parts} {env}: {found}\n{self.output()}"
        return found[0]

    def output(self) -> str:
        return "\n".join(self.lines[-200:])

    def stop(self, timeout: float = 60.0) -> int:
        """Ctrl-C, then wait; SIGKILL the whole process group if it lingers (a test must not leak)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
            raise AssertionError(f"kvmesh up did not stop on SIGINT:\n{self.output()}") from None
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever it left behind (it should leave nothing)
                os.killpg(self.popen.pid, signal.SIGKILL)

    def __enter__(self) -> KvmeshUp:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
