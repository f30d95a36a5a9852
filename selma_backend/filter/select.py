"""Choosing what to keep from CLIP scores: basic checks, near-duplicates, then a selection mode.

Pure functions over arrays (no model, no files), so tests can feed controlled embeddings. Every row
gets one reason: ``""`` (kept) or the first check that dropped it, in this order:

1. ``CHECKS`` (a registry, in order): ``broken_file``, ``empty_caption``, ``caption_too_long``,
   ``blank_image``;
2. ``near_duplicate``: within a skill, rows in score order; a row whose image embedding has a cosine
   above ``dedup_cosine`` with an image already kept is dropped (the better-scoring copy stays);
3. the mode (``MODES``) over the rows left; then ``below_floor`` for kept rows under ``floor``.

Ties in score are broken by file name, so the result never depends on row order.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import invalid
from ..registry import Registry

if TYPE_CHECKING:
    from .config import FilterConfig


@dataclass
class Scored:
    """What selection looks at, one entry per metadata row."""

    rows: list[dict[str, Any]]  # metadata rows: file_name, text, skill, prompt_id, ...
    scores: np.ndarray  # (N,) cosine(image, caption); NaN where the image is broken
    image_emb: np.ndarray  # (N, D) unit vectors; zeros where broken
    pixel_std: np.ndarray  # (N,) grey-level std of the image, 0..255
    broken: dict[int, str]  # row index -> why the file could not be read
    caption_tokens: list[int]  # BPE tokens of each caption (no start/end tokens)
    max_tokens: int  # the caption limit actually applied

    def __len__(self) -> int:
        return len(self.rows)

    def skill(self, i: int) -> str:
        return str(self.rows[i].get("skill") or "")

    def rank_key(self, i: int) -> tuple[float, str]:
        """Sort key: best score first, then file name."""
        return (-float(self.scores[i]), str(self.rows[i].get("file_name")))


Check = Callable[[Scored, int, "FilterConfig"], bool]  # True: row i fails the check
CHECKS: Registry[Check] = Registry("basic check")
CHECKS.add("broken_file", lambda s, i, cfg: i in s.broken)
CHECKS.add("empty_caption", lambda s, i, cfg: not str(s.rows[i].get("text") or "").strip())
CHECKS.add("caption_too_long", lambda s, i, cfg: s.caption_tokens[i] > s.max_tokens)
CHECKS.add("blank_image", lambda s, i, cfg: float(s.pixel_std[i]) < cfg.min_pixel_std)

Mode = Callable[[Scored, list[int], "FilterConfig"], dict[int, str]]  # -> dropped row index -> reason
MODES: Registry[Mode] = Registry("filter mode")


def _threshold(s: Scored, alive: list[int], cfg: FilterConfig) -> dict[int, str]:
    return {i: "below_threshold" for i in alive if s.scores[i] < cfg.threshold}


def _per_skill(s: Scored, alive: list[int], cfg: FilterConfig) -> dict[int, str]:
    return {i: "below_threshold" for i in alive if s.scores[i] < cfg.skill_threshold(s.skill(i))}


def _keep_fraction(s: Scored, alive: list[int], cfg: FilterConfig) -> dict[int, str]:
    """The best ceil(fraction x n) rows of each skill (DataComp's CLIP-score percentile, per expert)."""
    dropped = {}
    for members in _groups(alive, s.skill).values():
        k = math.ceil(cfg.keep_fraction * len(members) - 1e-9)
        dropped.update({i: "below_fraction" for i in sorted(members, key=s.rank_key)[k:]})
    return dropped


def _top_k_per_prompt(s: Scored, alive: list[int], cfg: FilterConfig) -> dict[int, str]:
    """The ``top_k`` best rows of each prompt (by prompt_id; the caption when a row has none)."""
    dropped = {}
    for members in _groups(alive, lambda i: str(s.rows[i].get("prompt_id") or s.rows[i].get("text"))).values():
        dropped.update({i: "not_top_k" for i in sorted(members, key=s.rank_key)[cfg.top_k:]})
    return dropped


MODES.add("threshold", _threshold)
MODES.add("keep_fraction", _keep_fraction)
MODES.add("top_k_per_prompt", _top_k_per_prompt)
MODES.add("per_skill", _per_skill)


def _groups(indices: list[int], key: Callable[[int], str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        groups[key(i)].append(i)
    return groups


def check_plan(cfg: FilterConfig, rows: list[dict[str, Any]]) -> None:
    """Refuse a plan that cannot be applied to these rows, before any model time is spent."""
    if cfg.mode == "per_skill":
        missing = sorted({str(r.get("skill") or "") for r in rows} - {s for s, _ in cfg.per_skill})
        if missing and cfg.threshold is None:
            raise invalid("per_skill", dict(cfg.per_skill), f"a threshold for every skill of the dataset: {missing} "
                          "have none", "add them, or give a default threshold for the others")


def choose(s: Scored, cfg: FilterConfig) -> list[str]:
    """One reason per row: "" to keep it, else why it is dropped (see the module doc)."""
    reasons = [""] * len(s)
    for name in CHECKS:
        check = CHECKS.get(name)
        for i in range(len(s)):
            if not reasons[i] and check(s, i, cfg):
                reasons[i] = name
    alive = [i for i in range(len(s)) if not reasons[i]]
    if cfg.dedup_cosine > 0:
        for members in _groups(alive, s.skill).values():
            for i in near_duplicates(s.image_emb, sorted(members, key=s.rank_key), cfg.dedup_cosine):
                reasons[i] = "near_duplicate"
    alive = [i for i in alive if not reasons[i]]
    for i, why in MODES.get(cfg.mode)(s, alive, cfg).items():
        reasons[i] = why
    if cfg.floor is not None:
        for i in alive:
            if not reasons[i] and s.scores[i] < cfg.floor:
                reasons[i] = "below_floor"
    return reasons


def near_duplicates(emb: np.ndarray, order: list[int], max_cosine: float, block: int = 1024) -> list[int]:
    """Rows of ``order`` (best first) whose embedding has cosine > ``max_cosine`` with an earlier *kept* row.

    Greedy, exact: a row is compared only with rows kept before it. Similarities are computed in
    blocks of ``block`` rows against the whole group ((block, n) floats at a time).
    """
    if len(order) < 2:
        return []
    e = np.asarray(emb[order], dtype=np.float32)  # (n, D) in rank order
    n = len(order)
    dropped = np.zeros(n, dtype=bool)
    for start in range(0, n, block):
        sims = e[start:start + block] @ e.T  # (b, n)
        for r in range(sims.shape[0]):
            i = start + r
            if dropped[i]:
                continue
            later = sims[r, i + 1:] > max_cosine
            dropped[i + 1:] |= later
    return [order[j] for j in np.flatnonzero(dropped)]
