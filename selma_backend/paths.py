"""Paths typed into widgets or sent to routes stay inside the folder they are meant for.

A dataset or project name is relative to a root (ComfyUI's output directory, ``models/loras``):
no absolute paths, no ``..``, no drive letters or backslashes, and no symlink inside the root that
points out of it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from .errors import invalid

_BAD_CHARS = re.compile(r"[\x00-\x1f\\:*?\"<>|]")


def safe_join(root: str | os.PathLike[str], name: str, *, field: str = "name") -> Path:
    """``root / name``, refusing anything that could land outside ``root``.

    ``name`` may have sub-folders (``"shop/spatial"``). The check resolves symlinks of every part
    that already exists, so a link inside ``root`` pointing elsewhere is refused too.
    """
    allowed = "a relative path inside the folder: letters, digits, '-', '_', '.', '/' (no '..', no absolute path)"
    if not isinstance(name, str) or not name.strip():
        raise invalid(field, name, allowed)
    if _BAD_CHARS.search(name) or name.startswith(("/", "~")):
        raise invalid(field, name, allowed)
    parts = PurePosixPath(name).parts
    if any(p in ("..", ".") for p in parts) or not parts:
        raise invalid(field, name, allowed)
    root_real = Path(root).resolve()
    target = root_real.joinpath(*parts)
    if not target.resolve().is_relative_to(root_real):
        raise invalid(field, name, allowed, f"It resolves outside {root_real} (through a symlink?)")
    return target


def slug(text: str) -> str:
    """A file-name-safe form of ``text`` (skill ids, model names) for default artefact names."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return s or "unnamed"
