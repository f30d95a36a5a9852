"""A merge in memory, for the merge-weights editor's live report: nothing is written.

    report = preview_merge(paths, widget_config("svd", "0.5, 0.5", 0, 0.5, "", 0))
    report.to_dict(); report.text()

The experts of the last preview stay loaded (keyed by path, size and modification time), so moving a
weight re-merges without reading and hashing the files again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from .config import MergeConfig, parse_block_weights, parse_weights
from .files import Expert, load_experts, merge_experts
from .report import MergeReport

_lock = threading.Lock()
_merging = threading.Lock()  # one preview merge at a time: moving a slider never stacks up parallel merges
_cache: dict[str, object] = {"key": None, "experts": None}


def widget_config(method: str, weights: str, rank: int, density: float, block_weights: str, seed: int) -> MergeConfig:
    """The MergeConfig of SELMA Merge Experts' widget values (rank 0, or method linear: no rank)."""
    return MergeConfig(method=method, weights=parse_weights(weights), rank=None if rank == 0 or method == "linear"
                       else rank, density=density, block_weights=parse_block_weights(block_weights), seed=seed)


def _key(paths: Sequence[Path]) -> tuple:
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


def cached_experts(paths: Sequence[str | os.PathLike[str]]) -> list[Expert]:
    """:func:`.files.load_experts`, reusing the last result while the same files are unchanged."""
    files = [Path(p) for p in paths]
    key = _key(files) if all(p.is_file() for p in files) else None
    with _lock:
        if key is not None and _cache["key"] == key:
            return list(_cache["experts"])  # type: ignore[arg-type]
    experts = load_experts(files)
    with _lock:
        _cache["key"], _cache["experts"] = key, experts
    return list(experts)


def preview_merge(paths: Sequence[str | os.PathLike[str]], config: MergeConfig) -> MergeReport:
    """Merge ``paths`` with ``config`` in memory and return the report (``out`` None: "(in memory)")."""
    config.expert_weights(len(paths))  # a wrong number of weights fails before any file is read
    with _merging:
        _tensors, report = merge_experts(cached_experts(paths), config)
    report.total_s = report.merge_s
    return report
