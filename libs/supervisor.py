"""Keep a local mesh serving: restart whichever of its processes dies, with backoff, the way Kubernetes'
`restartPolicy: Always` or compose's `restart: unless-stopped` would. `kvmesh up` runs it.

- A death is restarted at once the first time, then after 1, 2, 4 ... s (capped at 30 s) while the
  process keeps dying; a process that stayed up `stable_s` (60 s) before dying starts from "at once"
  again (Kubernetes' CrashLoopBackOff: 10 s doubling to 5 min, reset after 10 min up; a local mesh
  wants its worker back sooner).
- "Back" means healthy again, not merely running: a service's `/health` on its metrics port answers
  200 (attached to NATS), the gateway's `/health` 200, nats-server and redis-server listen on their port.
- A process that exits `max_failed_starts` (5) times in a row without ever becoming healthy cannot
  start at all (a bad flag, a missing model, a taken port): the supervisor gives up (`GaveUp`) naming
  it, its last exit and its log, and `kvmesh up` ends with exit code 1.

The mesh's own restart (`Mesh.restart`) respawns the same command line, environment and ports (NATS with
its JetStream store), so clients and peers find the process where it was. In-flight requests of a dead
worker move to another one meanwhile (the gateway's migration), so the mesh keeps serving throughout.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from kvmesh.libs.launcher import INFRA, Mesh, Proc

PROBE_TIMEOUT_S = 0.5  # one health probe; a loaded 2-core machine answers /health in milliseconds
PROBE_EVERY_S = 0.25  # per starting process
NO_PROBE_UP_S = 5.0  # a process without a health endpoint counts as healthy after this long alive


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    base_s: float = 1.0  # the second restart in a row waits this long, each later one twice the last
    max_s: float = 30.0
    stable_s: float = 60.0  # up this long before dying: the next restart is "at once" again
    max_failed_starts: int = 5  # exits in a row without ever becoming healthy: give up

    def delay(self, deaths_in_a_row: int) -> float:
        """Seconds before restarting after the n-th death in a row (n >= 1): 0, 1, 2, 4, ... max_s."""
        if deaths_in_a_row <= 1:
            return 0.0
        return min(self.max_s, self.base_s * 2 ** (deaths_in_a_row - 2))


class State(Enum):
    STARTING = "starting"  # running, not healthy yet
    UP = "up"  # healthy since its last start
    DOWN = "down"  # dead, restart due at `restart_at`


@dataclass(slots=True)
class Watched:
    proc: Proc
    state: State = State.STARTING
    started_at: float = 0.0  # monotonic
    died_at: float = 0.0
    restart_at: float = 0.0
    next_probe: float = 0.0
    deaths_in_a_row: int = 0  # since it last stayed up `stable_s`: picks the backoff delay
    failed_starts: int = 0  # exits in a row without becoming healthy in between
    restarts: int = 0
    last_exit: str = ""


class GaveUp(RuntimeError):
    """A process could not start: `kvmesh up` ends with exit code 1 and this message."""


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def clock_time() -> str:
    return time.strftime("%H:%M:%S")


class Supervisor:
    """Call `tick()` often (the launcher's wait loops do, through `Mesh.watchdog`), or `run()` until
    Ctrl-C. Everything it does is said through `say` (one line per event)."""

    def __init__(
        self,
        mesh: Mesh,
        policy: RestartPolicy | None = None,
        say: Callable[[str], None] | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mesh = mesh
        self.policy = policy or RestartPolicy()
        self.say = say or (lambda line: print(line, flush=True))
        self.now = now
        self.watched: dict[str, Watched] = {}

    def _sync(self) -> None:
        """Watch every process of the mesh (it lists them as it starts them)."""
        for p in self.mesh.procs:
            if p.name not in self.watched:
                self.watched[p.name] = Watched(p, started_at=self.now())

    def tick(self) -> None:
        """Notice deaths, restart what is due, mark restarted processes healthy. Raises GaveUp."""
        self._sync()
        for w in self.watched.values():
            now = self.now()
            if w.state is not State.DOWN and w.proc.popen.poll() is not None:
                self._died(w, describe_exit(w.proc.popen.returncode), now)
            if w.state is State.DOWN and now >= w.restart_at:
                self._restart(w, now)
            elif w.state is State.STARTING and now >= w.next_probe:
                w.next_probe = now + PROBE_EVERY_S
                if self.healthy(w, now):
                    self._back(w, self.now())

    def run(self, poll_s: float = 0.2) -> None:
        """Supervise until KeyboardInterrupt (Ctrl-C, SIGTERM in `kvmesh up`) or GaveUp."""
        while True:
            self.tick()
            time.sleep(poll_s)

    def _died(self, w: Watched, how: str, now: float) -> None:
        up_for = now - w.started_at
        w.last_exit = how
        if up_for >= self.policy.stable_s:
            w.deaths_in_a_row = 0
        w.deaths_in_a_row += 1
        if w.state is State.STARTING:
            w.failed_starts += 1
        w.state, w.died_at = State.DOWN, now
        delay = self.policy.delay(w.deaths_in_a_row)
        w.restart_at = now + delay
        self.say(f"kvmesh: {w.proc.name} died ({how}) at {clock_time()} after {up_for:.1f} s up")
        if w.failed_starts >= self.policy.max_failed_starts:
            raise GaveUp(self._give_up_message(w))
        when = "now" if delay == 0 else f"in {delay:g} s"
        self.say(f"kvmesh: {w.proc.name} restarting {when} (restart {w.restarts + 1})")

    def _restart(self, w: Watched, now: float) -> None:
        w.restarts += 1
        try:
            self.mesh.restart(w.proc.name)
        except Exception as exc:  # infra servers wait until they listen, and raise if they never do
            w.state = State.STARTING  # counts as a failed start
            self._died(w, f"failed to start: {exc}", now)
            return
        w.state, w.started_at, w.next_probe = State.STARTING, now, now

    def _back(self, w: Watched, now: float) -> None:
        first_start = w.restarts == 0
        w.state, w.failed_starts = State.UP, 0
        if not first_start:
            self.say(
                f"kvmesh: {w.proc.name} back at {clock_time()}, healthy {now - w.died_at:.1f} s after it "
                f"died (restarts: {w.restarts})"
            )

    def healthy(self, w: Watched, now: float) -> bool:
        """Running and answering: see the module docstring for what each kind of process must do."""
        if w.proc.popen.poll() is not None:
            return False
        url = self.health_url(w.proc.name)
        if url is None:
            return now - w.started_at >= NO_PROBE_UP_S
        if url.startswith("tcp://"):
            return _listens(url)
        try:
            with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as r:
                return r.status == 200
        except OSError:  # refused, 503 (not attached to NATS yet), timed out
            return False

    def health_url(self, name: str) -> str | None:
        if name in INFRA:
            url = self.mesh.nats_url if name == "nats" else self.mesh.redis_url
            return f"tcp://{urlsplit(url).netloc.rsplit('@', 1)[-1]}" if url else None
        if name == "gateway":
            return f"{self.mesh.base_url}/health"
        metrics = self.mesh.metrics_urls.get(name)
        return metrics.removesuffix("/metrics") + "/health" if metrics else None

    def _give_up_message(self, w: Watched) -> str:
        log_dir = self.mesh.config.log_dir
        log = f"its log: {log_dir / (w.proc.name + '.log')}" if log_dir else "its output is above"
        return (
            f"kvmesh: {w.proc.name} cannot start: it exited {w.failed_starts} times in a row without "
            f"becoming healthy (last: {w.last_exit}); {log}"
        )

    def restart_counts(self) -> dict[str, int]:
        return {name: w.restarts for name, w in self.watched.items()}

    def summary(self) -> str:
        counts = [f"{name} {n}" for name, n in self.restart_counts().items() if n]
        return "kvmesh: restarts: " + (", ".join(counts) if counts else "none")


def _listens(url: str) -> bool:
    import socket

    host, _, port = urlsplit(url).netloc.rpartition(":")
    with socket.socket() as s:
        s.settimeout(PROBE_TIMEOUT_S)
        return s.connect_ex((host or "127.0.0.1", int(port))) == 0
