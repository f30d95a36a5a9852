"""Stage-5 configuration: how LoRA experts are merged. One frozen dataclass shared by the CLI, the node and
the tests, validated on construction and written into the merged file (``selma.provenance``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import invalid
from .math import MERGE_METHODS

#: Blocks a per-block weight can address. A kohya module name decides its block (see ``block_of``).
BLOCKS = ("down", "mid", "up", "te", "other")
#: Methods that use ``density`` (the fraction of entries each delta keeps) and ``seed`` (DARE's random drops).
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SEED_METHODS = ("dare_linear", "dare_ties")
DTYPES = ("auto", "fp16", "bf16", "fp32")  # auto: the dtype of the first expert's tensors


@dataclass(frozen=True)
class MergeConfig:
    """How to merge N experts into one LoRA.

    method: a ``MERGE_METHODS`` name -- ``linear`` (exact, rank = sum of the experts' ranks), ``svd`` (best
        rank-``rank`` approximation of the weighted sum), ``ties`` / ``dare_linear`` / ``dare_ties`` /
        ``magnitude_prune`` (task arithmetic on each module's dense delta, then truncated SVD to ``rank``).
    weights: one per expert, in input order; None: ``1/N`` each (SELMA's merge). Any finite numbers.
    rank: target rank of every module (capped by what the module has); None: the largest expert rank.
        ``linear`` takes no rank (it is exact).
    density: fraction of entries each expert's delta keeps, in (0, 1]; only the ``DENSITY_METHODS`` use it.
    block_weights: a multiplier per block (``down``, ``mid``, ``up`` of the UNet, ``te`` for text encoders,
        ``other`` for the remaining UNet modules); a missing block is 1, a block at 0 is left out.
    seed: DARE's random drops (each module draws from a generator seeded by ``seed`` and its name).
    dtype: of the stored factors; ``auto`` = that of the first expert.
    strict_keys: refuse experts that do not all have the same modules. Off (the default), a module that only
        some experts have is the zero delta of the others.
    """

    method: str = "svd"
    weights: tuple[float, ...] | None = None
    rank: int | None = None
    density: float = 0.5
    block_weights: tuple[tuple[str, float], ...] = ()
    seed: int = 0
    dtype: str = "auto"
    strict_keys: bool = False

    def __post_init__(self) -> None:
        MERGE_METHODS.get(self.method)  # raises naming every method
        if self.weights is not None:
            if isinstance(self.weights, (str, bytes)) or not isinstance(self.weights, Sequence):
                raise invalid("weights", self.weights, "None (1/N each) or one number per expert")
            ws = tuple(self.weights)
            if not ws or not all(_finite(w) for w in ws):
                raise invalid("weights", self.weights, "None (1/N each) or one finite number per expert")
            object.__setattr__(self, "weights", tuple(float(w) for w in ws))
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 65536:
                raise invalid("rank", self.rank, "None (the largest expert rank) or an integer from 1 to 65536")
            if self.method == "linear":
                raise invalid("rank", self.rank, "None with method 'linear'",
                              "linear is exact: its rank is the sum of the experts' ranks; choose 'svd' for a "
                              "smaller file")
        if not _finite(self.density) or not 0.0 < self.density <= 1.0:
            raise invalid("density", self.density, "a number in (0, 1]", "0.5 keeps half of each delta's entries")
        object.__setattr__(self, "density", float(self.density))
        if isinstance(self.block_weights, Mapping):
            object.__setattr__(self, "block_weights", tuple(sorted(self.block_weights.items())))
        for block, w in self.block_weights:
            if block not in BLOCKS:
                raise invalid("block_weights", block, BLOCKS)
            if not _finite(w):
                raise invalid(f"block_weights[{block!r}]", w, "a finite number")
        blocks = [b for b, _ in self.block_weights]
        if len(set(blocks)) != len(blocks):
            raise invalid("block_weights", self.block_weights, "each block at most once")
        object.__setattr__(self, "block_weights", tuple(sorted((b, float(w)) for b, w in self.block_weights)))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise invalid("seed", self.seed, "an integer in [0, 2**63)")
        if self.dtype not in DTYPES:
            raise invalid("dtype", self.dtype, DTYPES)
        if not isinstance(self.strict_keys, bool):
            raise invalid("strict_keys", self.strict_keys, "True or False")

    def block_weight(self, block: str) -> float:
        return dict(self.block_weights).get(block, 1.0)

    def expert_weights(self, n: int) -> list[float]:
        """The weights for ``n`` experts: the configured ones (checked against ``n``) or ``1/n`` each."""
        if self.weights is None:
            return [1.0 / n] * n
        if len(self.weights) != n:
            raise invalid("weights", list(self.weights), f"{n} numbers, one per expert (or none: 1/{n} each)")
        return list(self.weights)

    def to_dict(self) -> dict[str, Any]:
        """What the merged file records: the fields that shaped this merge (density/seed only where used)."""
        d: dict[str, Any] = {"method": self.method, "weights": None if self.weights is None else list(self.weights),
                             "rank": self.rank, "block_weights": dict(self.block_weights), "dtype": self.dtype,
                             "strict_keys": self.strict_keys}
        d["density"] = self.density if self.method in DENSITY_METHODS else None
        d["seed"] = self.seed if self.method in SEED_METHODS else None
        return d


def _finite(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def parse_weights(text: str, field: str = "weights") -> tuple[float, ...] | None:
    """``"0.5, 0.25,0.25"`` (commas, spaces or new lines) -> (0.5, 0.25, 0.25); empty text -> None (1/N)."""
    parts = [p for p in text.replace("\n", ",").replace(" ", ",").split(",") if p.strip()]
    if not parts:
        return None
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        raise invalid(field, text, "numbers separated by commas, one per expert", "e.g. 0.5,0.25,0.25") from None


def parse_block_weights(text: str, field: str = "block_weights") -> dict[str, float]:
    """``"down=1, mid=0.5, up=1"`` -> {"down": 1.0, "mid": 0.5, "up": 1.0}; empty text -> {} (all 1)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.replace("\n", ",").split(","))):
        block, sep, value = part.partition("=")
        block = block.strip()
        if not sep or block not in BLOCKS:
            raise invalid(field, text, f"block=weight pairs with blocks from {', '.join(BLOCKS)}",
                          "e.g. down=1,mid=0.5,up=1")
        try:
            out[block] = float(value)
        except ValueError:
            raise invalid(field, text, "block=weight pairs with numeric weights", "e.g. down=1,mid=0.5") from None
    return out


def block_of(module: str) -> str:
    """The block of a kohya module name: ``down`` / ``mid`` / ``up`` (UNet), ``te`` (text encoders), ``other``."""
    if module.startswith("lora_te"):
        return "te"
    for block, marks in (("down", ("_down_blocks_", "_input_blocks_")), ("mid", ("_mid_block_", "_middle_block_")),
                         ("up", ("_up_blocks_", "_output_blocks_"))):
        if any(m in module for m in marks):
            return block
    return "other"
