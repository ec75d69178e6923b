"""The product's shape: one concept per module, so no module reaches 400 lines, and no import cycle
among its modules. Imports are read with `ast` (nothing is imported): every `kvmesh.*` import counts,
at the top, inside `if TYPE_CHECKING:` and inside function bodies, since a cycle hidden in a lazy
import is still a cycle. Module names come from pyproject.toml's package-dir (kvmesh.libs is libs/)."""

from __future__ import annotations

import ast
import itertools
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 400  # a module has fewer lines than this: one concept per module


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Package name -> its folder, from pyproject.toml (`kvmesh.libs` -> libs/)."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    return {name: root / folder for name, folder in pyproject["tool"]["setuptools"]["package-dir"].items()}


def product_modules(dirs: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the mapped folders. A folder mapped on its
    own (kvmesh.libs -> libs/) is left to that mapping, not named again through its parent's."""
    mapped = {folder.resolve() for folder in dirs.values()}
    modules: dict[str, Path] = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            inner = path.relative_to(folder).parts
            if (
                any((folder / Path(*inner[:k])).resolve() in mapped for k in range(1, len(inner)))
                or "__pycache__" in inner
            ):
                continue
            parts = [*package.split("."), *inner[:-1]]
            if inner[-1] != "__init__.py":
                parts.append(inner[-1].removesuffix(".py"))
            modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The product modules `name` imports (anywhere in the file) -> the line of the first such import.
    `kvmesh.a.b` is module kvmesh.a.b if there is one, else the longest prefix that is a module (b is
    a name inside kvmesh.a)."""

    def resolve(dotted: str) -> str | None:
        parts = dotted.split(".")
        for k in range(len(parts), 0, -1):
            if (candidate := ".".join(parts[:k])) in modules:
                return candidate
        return None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [resolve(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` steps up
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [resolve(f"{base}.{alias.name}") for alias in node.names]
        else:
            continue
        for target in targets:
            if target is not None and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def a_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """One shortest cycle through the component's first module, as the path of modules (breadth-first)."""
    members, start = set(component), component[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if nxt in members and nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its own component")


def describe_cycles(graph: dict[str, dict[str, int]], modules: dict[str, Path], root: Path) -> list[str]:
    out = []
    for component in strongly_connected(graph):
        path = a_cycle(graph, component)
        steps = [
            f"  {a} -> {b} ({modules[a].relative_to(root)}:{graph[a][b]})"
            for a, b in itertools.pairwise(path)
        ]
        out.append(f"cycle among {len(component)} modules {component}:\n" + "\n".join(steps))
    return out


def test_the_cycle_finder_reports_each_cycle(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = { "kvmesh" = "kvmesh", "kvmesh.libs" = "libs" }\n'
    )
    files = {
        "kvmesh/__init__.py": "",
        "libs/__init__.py": "",
        "libs/a.py": "from kvmesh.libs.b import thing\n",
        "libs/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kvmesh.libs import a\n",
        "libs/c.py": "def f():\n    import kvmesh.libs.d.name\n",  # a name inside d: the edge is to d
        "libs/d.py": "from .c import f\n",
        "libs/e.py": "from kvmesh.libs.a import thing\nimport os\n",  # into a cycle, on none
        "libs/sub/__init__.py": "from kvmesh.libs import e\n",  # sub/ is not mapped on its own
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = product_modules(package_dirs(tmp_path))
    assert set(modules) == {
        "kvmesh",
        "kvmesh.libs",
        *(f"kvmesh.libs.{m}" for m in "abcde"),
        "kvmesh.libs.sub",
    }
    graph = import_graph(modules)
    assert graph["kvmesh.libs.c"] == {"kvmesh.libs.d": 2}
    assert strongly_connected(graph) == [
        ["kvmesh.libs.a", "kvmesh.libs.b"],
        ["kvmesh.libs.c", "kvmesh.libs.d"],
    ]
    report = describe_cycles(graph, modules, tmp_path)
    assert len(report) == 2 and "kvmesh.libs.a -> kvmesh.libs.b (libs/a.py:1)" in report[0], report


def test_every_module_is_under_the_line_limit():
    modules = product_modules(package_dirs())
    assert len(modules) > 40, "the scan found the source tree"
    sizes = {path: len(path.read_text().splitlines()) for path in modules.values()}
    offenders = [
        f"{path.relative_to(ROOT)}: {n} lines" for path, n in sorted(sizes.items()) if n >= MAX_LINES
    ]
    assert not offenders, f"modules of {MAX_LINES} lines or more (split them):\n" + "\n".join(offenders)


def test_no_import_cycle_among_the_product_modules():
    modules = product_modules(package_dirs())
    graph = import_graph(modules)
    assert sum(map(len, graph.values())) > 100, "the scan found the imports"
    cycles = describe_cycles(graph, modules, ROOT)
    assert not cycles, "\n".join(cycles)
