#!/usr/bin/env bash
# The test command: lint, then the whole suite (real model, real servers started by the fixtures).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
python -m pytest -q "$@"
