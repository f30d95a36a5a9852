"""Files a user made are never lost: atomic writes, durable appends, no silent overwrite."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import SelmaError


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The bytes go to a temporary file in the same folder, are fsynced, then renamed over ``path``.
    With ``overwrite=False`` an existing file is an error instead (nothing is replaced silently).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise SelmaError(f"{path}: exists already; choose another name or remove it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _default_mode())  # mkstemp makes 0600; a user's artefacts get the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the target appeared meanwhile: no race overwrites a user's file.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise SelmaError(f"{path}: exists already; choose another name or remove it first") from None
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _default_mode() -> int:
    """0o666 minus the process umask: the mode ``open()`` would have given a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, overwrite: bool = True) -> Path:
    text = json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
    return atomic_write_text(path, text, overwrite=overwrite)


def append_jsonl(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Append whole lines and fsync, so a killed run keeps every line written before it died.

    A torn last line (from a crash in the middle of a write) is dropped by :func:`read_jsonl`.
    """
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(path)
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    with open(path, "ab") as f:
        f.write(data.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def drop_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline (a write torn by a crash) so appends stay line-aligned."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Walk back to the last newline; files are small enough for one read.
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL file; a final line without newline (torn by a crash) is ignored.

    A malformed line anywhere else is an error naming the file and line number.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes().decode("utf-8")
    lines = raw.split("\n")
    complete, tail = lines[:-1], lines[-1]
    rows = []
    for i, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SelmaError(f"{path}, line {i}: not valid JSON ({e.msg}); fix or remove that line") from e
    del tail  # an unterminated last line is a torn write: dropped, to be re-made on resume
    return rows


def folder_fingerprint(path: str | os.PathLike[str] | None, suffixes: tuple[str, ...] = ()) -> str:
    """A cheap fingerprint of a folder's files (names, sizes, mtimes), for cache keys.

    ComfyUI re-uses a node's output while its inputs are unchanged; a node that reads a folder
    returns this from ``fingerprint_inputs`` so an edited file re-runs it.
    """
    if path is None or not Path(path).is_dir():
        return "none"
    parts = []
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and (not suffixes or p.suffix.lower() in suffixes):
            st = p.stat()
            parts.append(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts) or "empty"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Streaming sha256 of a file's bytes (weights can be many GB: never read whole)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
