"""Nothing that can run code from data: no pickle (or its relatives) anywhere in the product, no
eval/exec, no torch.load without weights_only, no yaml.load. Everything on the wire is msgspec
(msgpack/JSON) into declared structs (schemas/)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("libs", "services", "schemas", "kernels", "loadtest")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [
                f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Name) and fn.id in UNSAFE_BUILTINS:
                found.append(f"{where} calls {fn.id}()")
            elif isinstance(fn, ast.Attribute):
                owner = fn.value.id if isinstance(fn.value, ast.Name) else None
                keywords = {k.arg: k.value for k in node.keywords}
                safe_load = (
                    isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value
                )
                if owner == "torch" and fn.attr == "load" and not safe_load:
                    found.append(f"{where} calls torch.load without weights_only=True")
                if owner == "yaml" and fn.attr in {"load", "unsafe_load", "full_load"}:
                    found.append(f"{where} calls yaml.{fn.attr} (use yaml.safe_load)")
                if owner in {"np", "numpy"} and fn.attr == "load" and "allow_pickle" in keywords:
                    found.append(f"{where} calls numpy.load with allow_pickle")
    return found


def test_the_scan_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    lines = ["import pickle", "from marshal import loads", "import torch, yaml", "eval('1')", "exec('x=1')"]
    lines += ["torch.load('f')", "yaml.load(s)", "model.eval()", "torch.load('f', weights_only=True)"]
    bad.write_text("\n".join(lines) + "\n")
    problems = _problems(bad)
    assert len(problems) == 6, problems  # model.eval() and the weights_only load are fine


def test_no_pickle_eval_or_exec_in_the_product():
    files = [p for folder in PRODUCT for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 40, "the scan found the source tree"
    problems = [f"{path.relative_to(ROOT).parent}/{problem}" for path in files for problem in _problems(path)]
    assert not problems, "\n".join(problems)
