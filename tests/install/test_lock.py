"""The dependency lock (infra/requirements.lock) agrees with pyproject.toml, and this environment was
installed from it (infra/install.sh installs with the lock as pip constraints)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("kvmesh_lock", ROOT / "infra" / "lock.py")
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)


def test_the_lock_was_made_from_pyprojects_current_dependencies():
    assert lock.locked_digest() == lock.dependencies_digest(), (
        "pyproject.toml's dependencies changed since the lock was made: run `python infra/lock.py`"
    )


def test_every_requirement_is_locked_at_a_version_it_accepts():
    pins = lock.read_lock()
    lists = lock.dependency_lists()
    for text in lists["dependencies"] + lists["dev"]:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = lock.normalise(req.name)
        assert name in pins, f"{req.name} is not in the lock: run `python infra/lock.py`"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"the lock's {name}=={pins[name]} does not satisfy {text!r}: run `python infra/lock.py`"
        )


@pytest.mark.skipif(sys.platform != "linux", reason="the lock is resolved for Linux")
def test_this_environment_has_the_locked_versions():
    wrong = {}
    for name, version in lock.read_lock().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong[name] = (version, None)
            continue
        if Version(installed).public != Version(version).public:  # torch's "+cpu" build label aside
            wrong[name] = (version, installed)
    assert not wrong, f"(locked, installed) differ: {wrong}; install with `bash infra/install.sh`"


def test_digest_changes_when_a_pin_changes(tmp_path):
    original = (ROOT / "pyproject.toml").read_text()
    assert '"pytest>=8,<9.2"' in original
    changed = tmp_path / "pyproject.toml"
    changed.write_text(original.replace('"pytest>=8,<9.2"', '"pytest>=8,<9.3"'))
    assert lock.dependencies_digest(changed) != lock.dependencies_digest()
