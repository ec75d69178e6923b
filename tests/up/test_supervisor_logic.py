"""The supervisor's restart policy on a stand-in mesh and a hand-driven clock: when it restarts, what
it says, when it resets the backoff, and when it gives up. The real processes: tests/cli/."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kvmesh.libs.launcher import Proc
from kvmesh.libs.supervisor import GaveUp, RestartPolicy, Supervisor, describe_exit


class FakePopen:
    def __init__(self) -> None:
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class FakeMesh:
    def __init__(self, names: list[str], log_dir: Path | None = None) -> None:
        self.procs = [Proc(name, FakePopen()) for name in names]  # type: ignore[arg-type]
        self.config = SimpleNamespace(log_dir=log_dir)
        self.restarted: list[str] = []

    def restart(self, name: str) -> None:
        proc = next(p for p in self.procs if p.name == name)
        assert proc.popen.poll() is not None
        proc.popen = FakePopen()  # type: ignore[assignment]
        self.restarted.append(name)

    def kill(self, name: str, code: int = -9) -> None:
        next(p for p in self.procs if p.name == name).popen.returncode = code


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Harness(Supervisor):
    """Healthy = whatever the test says (the real probes are HTTP / TCP: tests/cli)."""

    def __init__(self, mesh: FakeMesh, clock: Clock) -> None:
        self.lines: list[str] = []
        super().__init__(mesh, RestartPolicy(), self.lines.append, clock)  # type: ignore[arg-type]
        self.up: set[str] = set()

    def healthy(self, w, now: float) -> bool:
        return w.proc.popen.poll() is None and w.proc.name in self.up


def started(names: list[str]) -> tuple[FakeMesh, Clock, Harness]:
    mesh, clock = FakeMesh(names, Path("/logs")), Clock()
    sup = Harness(mesh, clock)
    sup.up = set(names)
    sup.tick()
    assert sup.lines == [], "a first start that becomes healthy says nothing"
    return mesh, clock, sup


def test_backoff_delays_double_up_to_the_cap_and_start_at_zero():
    policy = RestartPolicy()
    assert [policy.delay(n) for n in range(1, 9)] == [0, 1, 2, 4, 8, 16, 30, 30]


def test_a_killed_process_is_restarted_at_once_and_reported_back_when_healthy():
    mesh, clock, sup = started(["nats", "worker-1"])
    clock.t = 100.0
    mesh.kill("worker-1")
    sup.up.discard("worker-1")
    sup.tick()
    assert mesh.restarted == ["worker-1"], "the first restart is immediate"
    assert "worker-1 died (killed by SIGKILL)" in sup.lines[0]
    assert "restarting now (restart 1)" in sup.lines[1]
    clock.t = 103.0
    sup.tick()
    assert len(sup.lines) == 2, "running but not healthy is not back"
    sup.up.add("worker-1")
    clock.t = 104.0  # the next probe
    sup.tick()
    assert "worker-1 back" in sup.lines[2] and "healthy 4.0 s after it died (restarts: 1)" in sup.lines[2]
    assert sup.summary() == "kvmesh: restarts: worker-1 1"


def test_deaths_in_a_row_back_off_and_a_stable_run_resets_the_delay():
    mesh, clock, sup = started(["worker-0"])
    waits = []
    for _ in range(4):  # dies 10 s after each (healthy) start: a crash loop
        clock.t += 10.0
        mesh.kill("worker-0", 1)
        sup.tick()
        restart_at = sup.watched["worker-0"].restart_at
        waits.append(restart_at - clock.t)
        clock.t = restart_at
        sup.tick()  # restarts
        sup.tick()  # healthy again
    assert waits == [0, 1, 2, 4]
    assert sup.restart_counts() == {"worker-0": 4}
    clock.t += 61.0  # up longer than stable_s: the next death is a first one again
    mesh.kill("worker-0", 1)
    sup.tick()
    assert sup.watched["worker-0"].restart_at == clock.t


def test_five_exits_without_becoming_healthy_give_up_naming_the_process_its_exit_and_log():
    mesh, clock, sup = started(["gateway", "worker-0"])
    sup.up.discard("worker-0")
    with pytest.raises(GaveUp) as info:
        for _ in range(10):
            mesh.kill("worker-0", 2)
            sup.tick()
            clock.t = sup.watched["worker-0"].restart_at
            sup.tick()
    message = str(info.value)
    assert "worker-0 cannot start" in message and "5 times in a row" in message
    assert "last: exit code 2" in message and "/logs/worker-0.log" in message
    assert mesh.restarted == ["worker-0"] * 5, "a healthy run, then 5 failed starts"


def test_exit_descriptions():
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(3) == "exit code 3"
