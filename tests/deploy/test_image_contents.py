"""What the image gets: infra/Dockerfile runs a regular (non-editable) `pip install .`, which copies
only the packages pyproject lists; an editable install finds unlisted subpackages anyway, so a
missing entry passes every local test and breaks `python -m kvmesh.services.<x>` in the container."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def listed_packages() -> tuple[set[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(setuptools["packages"]), setuptools["package-dir"]


def source_packages(package_dir: dict[str, str]) -> set[str]:
    found = set()
    for package, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            if "__pycache__" in relative.parts or "results" in relative.parts:
                continue
            found.add(".".join([package, *relative.parts]))
    return found


def test_every_python_package_is_listed_for_the_image():
    listed, package_dir = listed_packages()
    missing = source_packages(package_dir) - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_every_service_the_deployments_run_is_in_the_image():
    listed, package_dir = listed_packages()
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    for folder in package_dir.values():
        assert re.search(rf"^COPY {folder} {folder}$", dockerfile, re.M), f"the image lacks {folder}/"
    compose = (ROOT / "docker-compose.yml").read_text()
    values = (ROOT / "infra" / "k8s" / "kvmesh" / "values.yaml").read_text()
    modules = set(re.findall(r"kvmesh\.services\.[a-z_]+", compose + values))
    assert len(modules) >= 6
    assert modules <= listed, f"not packaged: {sorted(modules - listed)}"
