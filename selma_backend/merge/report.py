"""What a merge reports: per-layer and overall error, rank, file size, sources -- as a dict (``to_dict``),
as text (the node shows it) and inside the merged file (``selma.provenance``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerStat:
    """One merged module: its block, rank, how many experts had it, and its errors (see ``layer.LayerResult``)."""

    module: str
    block: str
    rank: int
    experts: int
    error: float
    method_error: float


@dataclass
class MergeReport:
    """The outcome of one merge. ``error`` is ``||dW_merged - sum w_i dW_i||_F / ||sum w_i dW_i||_F`` over all
    modules together (each module's target includes its block weight); ``method_error`` measures against
    the method's own dense result (equal to ``error`` for linear and svd)."""

    config: dict[str, Any]
    sources: list[dict[str, Any]]
    base: str | None
    weights: list[float]
    layers: list[LayerStat]
    error: float
    method_error: float
    rank: int  # the largest module rank
    partial: dict[str, list[str]] = field(default_factory=dict)  # module -> experts (file names) without it
    dropped: list[str] = field(default_factory=list)  # modules left out by a block weight of 0
    out: str | None = None
    file_size: int | None = None
    merge_s: float = 0.0
    total_s: float = 0.0

    @property
    def method(self) -> str:
        return self.config["method"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(x) for x in self.layers]
        d["error"], d["method_error"] = _num(self.error), _num(self.method_error)
        for layer in d["layers"]:
            layer["error"], layer["method_error"] = _num(layer["error"]), _num(layer["method_error"])
        return d

    def provenance(self) -> dict[str, Any]:
        """The ``selma.provenance`` value of the merged file (compact: errors per module by name)."""
        return {"stage": "merge", "base": self.base, "config": self.config, "weights": self.weights,
                "sources": self.sources, "rank": self.rank, "error": _num(self.error),
                "method_error": _num(self.method_error), "file_size": self.file_size,
                "errors": {x.module: _num(x.error) for x in self.layers},
                "ranks": {x.module: x.rank for x in self.layers},
                "partial": self.partial, "dropped": self.dropped}

    def text(self, worst: int = 5) -> str:
        """A few lines for a person: method, sources, overall error, rank, size, the worst modules."""
        cfg = self.config
        lines = [f"{cfg['method']} merge of {len(self.sources)} experts -> {self.out or '(in memory)'}"]
        for src, w in zip(self.sources, self.weights, strict=True):
            lines.append(f"  {w:+.4g} x {src['file']} (rank {src['rank']}, {src['layout']}, sha256 {src['sha256'][:12]})")
        extra = []
        if cfg.get("density") is not None:
            extra.append(f"density {cfg['density']:g}")
        if cfg.get("seed") is not None:
            extra.append(f"seed {cfg['seed']}")
        if cfg.get("block_weights"):
            extra.append("blocks " + ", ".join(f"{k}={v:g}" for k, v in cfg["block_weights"].items()))
        lines.append(f"base {self.base or 'unknown'}; {len(self.layers)} modules; rank {self.rank}"
                     + (f"; {'; '.join(extra)}" if extra else ""))
        lines.append(f"relative error vs sum w_i dW_i: {_fmt(self.error)} overall"
                     + (f"; vs the {cfg['method']} result: {_fmt(self.method_error)}"
                        if cfg["method"] not in ("linear", "svd") else ""))
        for x in sorted(self.layers, key=lambda x: -_num_or_inf(x.error))[:worst]:
            lines.append(f"  {_fmt(x.error)}  rank {x.rank}  {x.module}")
        if self.partial:
            lines.append(f"{len(self.partial)} modules missing from some experts (zero delta there)")
        if self.dropped:
            lines.append(f"{len(self.dropped)} modules left out (block weight 0)")
        if self.file_size is not None:
            lines.append(f"file size {self.file_size / 2**20:.2f} MiB; merge {self.merge_s:.2f} s, total {self.total_s:.2f} s")
        return "\n".join(lines)


def overall_error(diff_sq: float, target_sq: float) -> float:
    if target_sq <= 0.0:
        return 0.0 if diff_sq <= 0.0 else math.inf
    return math.sqrt(diff_sq / target_sq)


def _num(x: float) -> float | str:
    """JSON has no inf: write it as the string "inf"."""
    return x if math.isfinite(x) else "inf"


def _num_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _fmt(x: float) -> str:
    return f"{x:.3e}" if math.isfinite(x) else "inf (target is zero)"
