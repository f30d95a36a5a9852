"""Model folders the world's trainers write (``world-clip``, ``world-sd``): never over a folder they did not make.

A folder is built in a hidden temporary sibling and renamed into place whole; an existing ``out`` is
replaced only with ``force`` and only when its record file says this trainer (``made_by``) wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import SelmaError


def made_by(path: Path, record_file: str, maker: str) -> bool:
    """Whether ``path/record_file`` names ``maker`` as the folder's maker."""
    try:
        return json.loads((path / record_file).read_text(encoding="utf-8")).get("made_by") == maker
    except (OSError, ValueError, AttributeError):
        return False


def check_target(out: Path, force: bool, record_file: str, maker: str, kind: str) -> None:
    """Raise unless ``out`` is free, or ``force`` and ``out`` is a ``kind`` folder ``maker`` wrote."""
    if not os.path.lexists(out):
        return
    if not force:
        raise SelmaError(f"{out}: exists already; choose another --out, or pass --force to replace a {kind}")
    if not made_by(out, record_file, maker):
        raise SelmaError(f"{out}: exists and is not a {kind} folder made by {maker}; it is left alone")


def publish_folder(out: Path, fill: Callable[[Path], None]) -> Path:
    """Let ``fill`` write a fresh folder, then rename it to ``out`` (replacing what the caller checked)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        fill(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 -> what mkdir gives
        if os.path.lexists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
