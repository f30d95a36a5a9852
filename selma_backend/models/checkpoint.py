"""Reading a single-file checkpoint: tensor shapes without loading, tensors one at a time.

A ``.safetensors`` file starts with an 8-byte little-endian header length and a JSON header
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``), so shapes — all that
architecture detection needs — cost one small read, whatever the file's size. Tensors are then
read lazily (memory-mapped) by ``safetensors.safe_open``.

Torch pickles (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) can run code when unpickled: they are refused
unless the user opts in, and then read with ``torch.load(weights_only=True)``, which only rebuilds
tensors and plain containers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SelmaError
from .config import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES

Shape = tuple[int, ...]
MAX_HEADER = 100 * 2**20  # a real header is a few hundred kB; more means "not a safetensors file"


def is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path: Path) -> SelmaError:
    """The error for a pickle file without the opt-in: names the file, the risk and the fix."""
    return SelmaError(
        f"{path}: is a torch pickle file ({path.suffix}); loading one can run code hidden in it, so it is refused. "
        "Convert it to .safetensors, or opt in with allow_pickle=True (node: 'allow pickle'), "
        "which reads it with torch.load(weights_only=True)")


def read_safetensors_header(path: Path) -> tuple[dict[str, Shape], dict[str, str]]:
    """(name -> shape, header metadata) of a .safetensors file, reading only its header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 2 <= n <= MAX_HEADER:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", None) or {}
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in header.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, struct.error) as e:
        raise SelmaError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e}); "
                         "re-download or re-export it") from e
    return shapes, metadata


@dataclass
class TensorFile:
    """A single-file checkpoint opened for reading: ``shapes`` up front, ``get(name)`` on demand."""

    path: Path
    shapes: dict[str, Shape]
    metadata: dict[str, str] = field(default_factory=dict)
    pickle: bool = False
    _tensors: dict[str, Any] | None = None  # a pickle's tensors (already in memory or memory-mapped)
    _handle: Any = None  # safetensors safe_open handle, opened on first get()

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def get(self, name: str) -> Any:
        """The tensor ``name`` (CPU, the file's dtype)."""
        if self._tensors is not None:
            return self._tensors[name]
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        return self._handle.get_tensor(name)

    def close(self) -> None:
        self._handle = None
        self._tensors = None


def open_checkpoint(path: Path, allow_pickle: bool = False) -> TensorFile:
    """Open ``path`` (safetensors, or a pickle with ``allow_pickle``) for shape queries and reads."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        shapes, metadata = read_safetensors_header(path)
        return TensorFile(path, shapes, metadata)
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise refuse_pickle(path)
        tensors = _load_pickle(path)
        return TensorFile(path, {k: tuple(v.shape) for k, v in tensors.items()}, pickle=True, _tensors=tensors)
    raise SelmaError(f"{path}: unknown checkpoint type {path.suffix!r}; allowed: "
                     f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)} files or a diffusers folder")


def _load_pickle(path: Path) -> dict[str, Any]:
    """torch.load with ``weights_only=True`` (tensors and containers only), memory-mapped when the format allows.

    LDM checkpoints wrap the weights as ``{"state_dict": {...}, "global_step": ...}``; that wrapper is
    removed and non-tensor entries are dropped.
    """
    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything beyond tensors; others for damaged files
        raise SelmaError(f"{path}: torch.load(weights_only=True) refused it ({type(e).__name__}: {str(e)[:300]}); "
                         "it holds more than tensors or is damaged. Convert it to .safetensors with a tool you trust") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SelmaError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors; not a model checkpoint")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
