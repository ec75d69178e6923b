"""Which port `kvmesh up` takes: a requested one (flag or KVMESH_PORT) or an error, never silently another;
only the unrequested default moves. The real command line: tests/cli/test_up_startup.py."""

from __future__ import annotations

import socket

import pytest

from kvmesh.libs import gateway_port
from kvmesh.libs.gateway_port import PortBusy, choose_port


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_requested_busy_port_is_an_error(busy_port):
    with pytest.raises(PortBusy, match=f"port {busy_port} is already in use"):
        choose_port(busy_port, {})
    with pytest.raises(PortBusy):
        choose_port(None, {"KVMESH_PORT": str(busy_port)})


def test_a_requested_free_port_is_taken_as_is(busy_port):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert choose_port(free, {"KVMESH_PORT": str(busy_port)}) == (free, None), "the flag wins over the env"


def test_port_zero_and_a_busy_default_pick_a_free_port_and_say_so(busy_port, monkeypatch):
    port, note = choose_port(0, {})
    assert port > 0 and note is not None and str(port) in note
    monkeypatch.setattr(gateway_port, "DEFAULT_PORT", busy_port)
    port, note = choose_port(None, {})
    assert port != busy_port and note is not None and f"default port {busy_port} is taken" in note
