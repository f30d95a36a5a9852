"""selma_backend must never import ComfyUI: every module imports with ComfyUI's modules blocked."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import selma_backend

BLOCKED = ("comfy", "folder_paths", "server", "nodes", "comfy_api", "comfy_execution", "comfy_extras", "execution")
BACKEND = Path(selma_backend.__file__).parent

_IMPORT_ALL = r"""
import importlib, importlib.abc, pkgutil, sys
BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"selma_backend imported ComfyUI module {name!r}")
        return None

sys.meta_path.insert(0, Block())
import selma_backend
names = [m.name for m in pkgutil.walk_packages(selma_backend.__path__, "selma_backend.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print(len(names))
"""


def test_every_backend_module_imports_with_comfyui_blocked():
    out = subprocess.run([sys.executable, "-c", _IMPORT_ALL, ",".join(BLOCKED)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert int(out.stdout.split()[-1]) >= 5  # the walk really found the package's modules


def test_no_backend_source_names_a_comfyui_module():
    """Also catches imports hidden inside functions that the import walk never runs."""
    offenders = []
    for path in BACKEND.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.relative_to(BACKEND)}:{node.lineno} {n}" for n in names if n.split(".")[0] in BLOCKED]
    assert offenders == []


def test_backend_uses_relative_imports_for_itself():
    """Absolute ``selma_backend`` imports would load a second copy when ComfyUI loads the pack folder."""
    offenders = []
    for path in BACKEND.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("selma_backend"):
                offenders.append(f"{path.relative_to(BACKEND)}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name.startswith("selma_backend") for a in node.names):
                offenders.append(f"{path.relative_to(BACKEND)}:{node.lineno}")
    assert offenders == []


def test_walk_finds_modules():
    assert len(list(pkgutil.walk_packages(selma_backend.__path__, "selma_backend."))) >= 5
