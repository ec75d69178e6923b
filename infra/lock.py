"""The dependency lock: every package `infra/install.sh` installs, at one exact version.

`python infra/lock.py` re-resolves pyproject.toml's dependencies and its `dev` extra as a fresh machine
would (pip's own resolver, `--dry-run --ignore-installed`, with this machine's pip configuration, so
torch stays the CPU build from local disk) and writes `infra/requirements.lock`. install.sh installs
with `-c infra/requirements.lock`: a constraints file, so a platform whose resolution needs other
packages (CUDA torch's nvidia-* wheels, say) still installs, while every package the lock names gets
its locked version. The lock's header carries a digest of pyproject.toml's dependency lists;
tests/test_lock.py fails when the two disagree.

`python infra/lock.py --check` only compares the digest (exit 1 when stale).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "infra" / "requirements.lock"
DIGEST_PREFIX = "# pyproject-dependencies-sha256: "


def dependency_lists(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, list[str]]:
    """The requirement strings the lock is made from: the project's dependencies and its dev extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return {"dependencies": project["dependencies"], "dev": project["optional-dependencies"]["dev"]}


def dependencies_digest(pyproject: Path = ROOT / "pyproject.toml") -> str:
    text = json.dumps(dependency_lists(pyproject), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def locked_digest(lock: Path = LOCK) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(DIGEST_PREFIX):
            return line.removeprefix(DIGEST_PREFIX).strip()
    return None


def read_lock(lock: Path = LOCK) -> dict[str, str]:
    """Package name (PEP 503 normalised) -> locked version."""
    pins = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def resolve() -> dict[str, str]:
    """What pip installs for `.[dev]` on a machine with nothing installed: name -> version."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        cmd += ["--disable-pip-version-check", "--report", str(report), "-e", f"{ROOT}[dev]"]
        print("resolving:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
        installs = json.loads(report.read_text())["install"]
    pins = {}
    for item in installs:
        name, version = normalise(item["metadata"]["name"]), item["metadata"]["version"]
        if name != "kvmesh":
            # A local label (torch's "+cpu") names one build; the lock pins the release, so any build
            # of it (a CPU wheel from disk, PyPI's CUDA one) satisfies the constraint.
            pins[name] = version.split("+", 1)[0]
    return pins


def write_lock(pins: dict[str, str]) -> None:
    header = [
        "# The dependency lock, used by infra/install.sh as pip constraints. Do not edit by hand:",
        "# refresh with `python infra/lock.py` after changing pyproject.toml's dependencies.",
        f"# Resolved for Python {sys.version_info.major}.{sys.version_info.minor} on Linux x86_64.",
        DIGEST_PREFIX + dependencies_digest(),
    ]
    body = [f"{name}=={version}" for name, version in sorted(pins.items())]
    LOCK.write_text("\n".join(header + body) + "\n")
    print(f"wrote {LOCK.relative_to(ROOT)}: {len(pins)} packages", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the lock is current")
    args = parser.parse_args()
    if args.check:
        current = locked_digest() == dependencies_digest()
        print("lock is current" if current else "lock is stale: run python infra/lock.py", file=sys.stderr)
        return 0 if current else 1
    write_lock(resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
