"""LoRA merging (S5). :mod:`.math` holds the pure tensor math; nothing here touches files or ComfyUI."""

from __future__ import annotations

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

__all__ = [
    "MERGE_METHODS",
    "auto_rank",
    "dare_linear",
    "dare_ties",
    "delta_weight",
    "linear_merge",
    "magnitude_prune",
    "merge_layer",
    "merged_singular_values",
    "relative_error",
    "svd_merge",
    "ties",
]
