"""Stage 3: score a dataset's (image, caption) pairs with CLIP and choose what to keep.

    with load_scorer(ScorerConfig(path="models/clip/ViT-B-32")) as scorer:
        report = filter_dataset(dataset_dir, scorer, FilterConfig(mode="threshold", threshold=0.28))
    effective_keep(row)                       # review > filter > keep, what training uses
    set_review(dataset_dir, "x_s0.png", "reject")

Modes: ``MODES`` (threshold, keep_fraction, top_k_per_prompt, per_skill); basic checks: ``CHECKS``.
"""

from .config import FilterConfig, ScorerConfig
from .report import FilterReport
from .review import effective_keep, set_review
from .run import filter_dataset
from .scorer import ClipScorer, load_scorer
from .select import CHECKS, MODES

__all__ = ["CHECKS", "MODES", "ClipScorer", "FilterConfig", "FilterReport", "ScorerConfig", "effective_keep",
           "filter_dataset", "load_scorer", "set_review"]
