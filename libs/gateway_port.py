"""Which port `kvmesh up` serves the OpenAI API on.

A port the user asked for (`--port N` or `KVMESH_PORT`) is a contract: scripts and clients point at
it, so a busy one is an error (exit 2), never silently another port. Only the default (8000, nobody
asked) may move to a free port, and says so. `--port 0` asks for any free port.
"""

from __future__ import annotations

import os

from kvmesh.libs.launcher import free_port, port_is_free

DEFAULT_PORT = 8000


class PortBusy(Exception):
    """The requested port is taken; its message is what `kvmesh up` prints before exiting with 2."""


def explicit_port(flag: int | None, environ: dict[str, str] | None = None) -> int | None:
    """The port the user asked for: the flag, else KVMESH_PORT, else None."""
    env = os.environ if environ is None else environ
    if flag is not None:
        return flag
    value = env.get("KVMESH_PORT", "").strip()
    return int(value) if value else None


def choose_port(flag: int | None, environ: dict[str, str] | None = None) -> tuple[int, str | None]:
    """(port, a note to print or None). Raises PortBusy for a requested port that is taken."""
    asked = explicit_port(flag, environ)
    if asked == 0:
        port = free_port()
        return port, f"kvmesh: --port 0: serving on free port {port}"
    if asked is not None:
        if not port_is_free(asked):
            raise PortBusy(
                f"kvmesh: port {asked} is already in use; stop what listens there, or choose another "
                "port (--port N, --port 0 for any free one)"
            )
        return asked, None
    if port_is_free(DEFAULT_PORT):
        return DEFAULT_PORT, None
    port = free_port()
    return port, f"kvmesh: default port {DEFAULT_PORT} is taken, serving on free port {port} instead"
