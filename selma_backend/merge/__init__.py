"""LoRA merging (S5). :mod:`.math` holds the pure tensor math, :mod:`.layer` one module's merge as stored
(with its measured error), :mod:`.files` the file merge (checks, atomic write, report), :mod:`.config` the
``MergeConfig`` shared by CLI, node and tests, :mod:`.search` data-driven weights, :mod:`.cli` ``selma merge``.
Layout conversion and the "keys matched" bridge live in :mod:`..lora`. Nothing here touches ComfyUI."""

from __future__ import annotations

from .config import BLOCKS, MergeConfig, block_of, parse_block_weights, parse_weights
from .files import Expert, check_experts, load_experts, merge_experts, merge_files
from .layer import LayerResult, merge_module
from .math import (
    MERGE_METHODS,
    auto_rank,
    dare_linear,
    dare_ties,
    delta_weight,
    linear_merge,
    magnitude_prune,
    merge_layer,
    merged_singular_values,
    relative_error,
    svd_merge,
    ties,
)
from .report import LayerStat, MergeReport

__all__ = [
    "BLOCKS",
    "MERGE_METHODS",
    "Expert",
    "LayerResult",
    "LayerStat",
    "MergeConfig",
    "MergeReport",
    "auto_rank",
    "block_of",
    "check_experts",
    "dare_linear",
    "dare_ties",
    "delta_weight",
    "linear_merge",
    "load_experts",
    "magnitude_prune",
    "merge_experts",
    "merge_files",
    "merge_layer",
    "merge_module",
    "merged_singular_values",
    "parse_block_weights",
    "parse_weights",
    "relative_error",
    "svd_merge",
    "ties",
]
