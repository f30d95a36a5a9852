"""Resumable training state: a folder per checkpoint, written atomically, the last K kept.

``<work dir>/checkpoints/step-000500/``::

    lora.safetensors   trainable LoRA parameters by name (fp32)
    optim.pt           optimizer, LR schedule and loss-scaler state dicts (tensors, numbers, lists:
                       written by us, read back with ``torch.load(weights_only=True)``)
    state.json         step, data position (epoch, batch), the config, the loss log so far

The folder is assembled under a temporary name and renamed into place, so a kill at any moment
leaves either the previous checkpoints or the new one complete, never a half one. The random state
needs no saving: every step seeds its own generators from (seed, step[, rank]) (see ``loop.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SelmaError

PREFIX = "step-"
STATE_VERSION = 1


@dataclass
class Position:
    """Where training is: optimizer steps done and the next batch (epoch, index) to read."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class Snapshot:
    position: Position
    params: dict[str, torch.Tensor]
    optim: dict[str, Any]
    log: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = work_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def save(work_dir: Path, snap: Snapshot, keep: int) -> Path:
    """Write ``snap`` as ``checkpoints/step-N`` atomically, then delete all but the newest ``keep``."""
    from safetensors.torch import save_file

    root = work_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{snap.position.step:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().float().cpu().contiguous() for k, v in snap.params.items()}, str(tmp / "lora.safetensors"))
    torch.save(snap.optim, tmp / "optim.pt")
    state = {"version": STATE_VERSION, "step": snap.position.step, "epoch": snap.position.epoch,
             "batch": snap.position.batch, "config": snap.config, "log": snap.log}
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoints(work_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_debris(work_dir: Path) -> list[str]:
    """Delete half-written checkpoint folders a killed run left (``.step-N.tmp-PID``); returns their names."""
    root = work_dir / "checkpoints"
    debris = [p for p in root.glob(f".{PREFIX}*.tmp-*") if p.is_dir()] if root.is_dir() else []
    for p in debris:
        shutil.rmtree(p, ignore_errors=True)
    return sorted(p.name for p in debris)


def load_latest(work_dir: Path) -> Snapshot | None:
    """The newest complete checkpoint, or None when there is none."""
    from safetensors.torch import load_file

    found = checkpoints(work_dir)
    if not found:
        return None
    path = found[-1]
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        params = load_file(str(path / "lora.safetensors"))
        optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise SelmaError(f"{path}: this checkpoint cannot be read ({type(e).__name__}: {e}); delete the folder to "
                         "resume from the one before it") from e
    pos = Position(int(state["step"]), int(state["epoch"]), int(state["batch"]))
    return Snapshot(pos, params, optim, list(state.get("log", [])), dict(state.get("config", {})), path)


def restore_params(params: Mapping[str, torch.nn.Parameter], saved: Mapping[str, torch.Tensor], where: Path | None) -> None:
    """Copy saved LoRA tensors into the live parameters; names and shapes must match exactly."""
    if set(params) != set(saved):
        missing, extra = sorted(set(params) - set(saved))[:3], sorted(set(saved) - set(params))[:3]
        raise SelmaError(f"{where}: the checkpoint's LoRA does not match this run's (missing {missing}, unexpected {extra}); "
                         "resume with the same preset, rank and model, or start a new run")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != saved[name].shape:
                raise SelmaError(f"{where}: {name} has shape {tuple(saved[name].shape)}, this run {tuple(p.shape)}")
            p.copy_(saved[name].to(p.device, p.dtype))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":
        _fsync(path)
