"""No pickle of anything a user did not create in this run: the code is scanned for the calls that
would run code hidden in a file (``torch.load`` without ``weights_only=True``, ``pickle``,
``numpy.load(allow_pickle=True)``, ``eval``/``exec``/``marshal``/``yaml.load``), and the one
``torch.load`` there is (a checkpoint's training state) stays the only one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "core" / "src", *sorted((ROOT / "plugins").glob("*/src"))]
#: where torch.load may appear: files stune itself wrote in this run or an earlier one of the same output_dir
TORCH_LOAD_ALLOWED = {"core/src/stune/checkpoint.py"}
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def findings(path: Path, source: str) -> list[str]:
    found = []
    rel = path.relative_to(ROOT).as_posix()
    for node in ast.walk(ast.parse(source)):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] in UNSAFE_MODULES for m in modules):
                found.append(f"{where}: imports {', '.join(modules)}")
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == "torch"
                and any(a.name == "load" for a in node.names)
            ):
                found.append(f"{where}: from torch import load (call it as torch.load, where this scan sees it)")
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        if name.split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: {name}(...)")
        if name.endswith("torch.load"):
            if not _is_true(_keyword(node, "weights_only")):
                found.append(f"{where}: {name}(...) without weights_only=True")
            elif rel not in TORCH_LOAD_ALLOWED:
                found.append(f"{where}: torch.load outside {sorted(TORCH_LOAD_ALLOWED)}: does it read a user's file?")
        if (
            name.split(".")[-1] == "load"
            and name.split(".")[0] in ("np", "numpy")
            and _is_true(_keyword(node, "allow_pickle"))
        ):
            found.append(f"{where}: {name}(allow_pickle=True)")
        if name in ("eval", "exec", "compile", "yaml.load", "yaml.unsafe_load"):
            found.append(f"{where}: {name}(...)")
    return found


def test_the_scanner_finds_what_it_looks_for() -> None:
    bad = """
import pickle
import numpy as np
import torch
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
np.load("x.npy", allow_pickle=True)
pickle.loads(b"")
eval("1")
"""
    found = findings(ROOT / "core" / "src" / "stune" / "example.py", bad)
    assert len(found) == 6, found
    ok = 'import torch\ntorch.load("x.pt", map_location="cpu", weights_only=True)\n'
    assert findings(ROOT / "core" / "src" / "stune" / "checkpoint.py", ok) == []


def test_no_code_of_ours_unpickles_or_evaluates_files() -> None:
    files = [p for source in SOURCES for p in source.rglob("*.py")]
    assert len(files) > 50
    found = [f for path in files for f in findings(path, path.read_text(encoding="utf-8"))]
    assert found == []
