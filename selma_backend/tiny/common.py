"""What every tiny-model writer shares: seeding, the provenance marker, atomic publishing.

A model is built in a hidden temporary folder (or file) beside its destination and renamed into
place only when complete, so a destination that exists is always whole. Each artefact records who
made it and from which seed: folders carry ``selma_tiny_model.json``, the single-file checkpoint
carries the same facts in its safetensors header. That record is also what lets ``force`` replace
a tiny model while never touching a model the user put there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from .. import __version__
from ..errors import SelmaError
from ..fsio import atomic_write_json

MARKER = "selma_tiny_model.json"
MADE_BY = "selma tiny-models"
# The single-file checkpoint's provenance: ONE safetensors header key holding JSON. safetensors writes
# the metadata map in hash order, so several keys would make the bytes differ from run to run.
HEADER_KEY = "selma.tiny_model"


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator for module construction, restoring the caller's RNG state after.

    Library ``__init__``s (diffusers, transformers) draw their default initialisation from the global
    generator; seeding it makes the weights a pure function of ``seed`` (on a given torch version).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def provenance(name: str, seed: int, packages: tuple[str, ...]) -> dict[str, object]:
    """The marker's content: what made the model, from which seed, with which library versions."""
    versions = {"selma": __version__}
    for pkg in ("torch", *packages):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = "absent"
    return {"made_by": MADE_BY, "name": name, "seed": seed, "versions": versions, "random_weights": True}


def read_provenance(path: Path) -> dict[str, object] | None:
    """What the marker (folder) or header (.safetensors file) at ``path`` says, or None if not a tiny model."""
    if path.is_dir():
        try:
            facts = json.loads((path / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return facts if isinstance(facts, dict) and facts.get("made_by") == MADE_BY else None
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # not a readable safetensors file: certainly not ours
            return None
        try:
            facts = json.loads(meta.get(HEADER_KEY, ""))
        except ValueError:
            return None
        return facts if isinstance(facts, dict) and facts.get("made_by") == MADE_BY else None
    return None


def header_metadata(name: str, seed: int) -> dict[str, str]:
    """safetensors metadata for a single-file tiny model (see ``HEADER_KEY``)."""
    return {HEADER_KEY: json.dumps({"made_by": MADE_BY, "name": name, "seed": seed}, sort_keys=True)}


def is_tiny_model(path: Path) -> bool:
    """True if ``path`` (folder or .safetensors file) was written by this module."""
    return read_provenance(path) is not None


def check_target(path: Path, force: bool) -> None:
    """Refuse to replace anything silently: an existing ``path`` needs ``force`` and must be ours."""
    if not os.path.lexists(path):
        return
    if not force:
        raise SelmaError(f"{path}: exists already; pass force=True (CLI: --force) to rewrite it")
    if not is_tiny_model(path):
        raise SelmaError(f"{path}: exists and was not written by {MADE_BY}; it is left alone. Move it away first")


def publish_dir(path: Path, name: str, seed: int, packages: tuple[str, ...], build: Callable[[Path], None],
                *, force: bool = False) -> Path:
    """Run ``build(tmp_dir)``, add the marker, then rename the folder to ``path`` (replacing ours if ``force``)."""
    check_target(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        build(tmp)
        atomic_write_json(tmp / MARKER, provenance(name, seed, packages))
        _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def publish_file(path: Path, build: Callable[[Path], None], *, force: bool = False) -> Path:
    """Run ``build(tmp_file)`` in ``path``'s folder, then rename it to ``path`` (replacing ours if ``force``)."""
    check_target(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        build(tmp)
        _swap_in(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _swap_in(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``; an old ``path`` (already checked to be ours) is moved aside, then deleted."""
    _usual_permissions(new)
    old = None
    if os.path.lexists(path):
        old = path.with_name(f".{path.name}.old.{os.getpid()}")
        os.replace(path, old)
    os.replace(new, path)
    if old is not None and old.is_dir():
        shutil.rmtree(old)
    elif old is not None:
        old.unlink()


def _usual_permissions(root: Path) -> None:
    """Give what mkdtemp/mkstemp made private (0700/0600) the modes a plain mkdir/open would (umask applied)."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
