"""Stage-3 configuration: which CLIP model scores the dataset, and how the scores choose what to keep.

Two frozen dataclasses, validated on construction and shared by the CLI, the node and the tests:
``ScorerConfig`` (the model: recorded beside the cached embeddings) and ``FilterConfig`` (the
selection: recorded in ``dataset.json`` under ``"filter"`` and in the summary).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import check_int, check_number, invalid

DTYPES = ("auto", "fp16", "bf16", "fp32")  # auto: fp16 on cuda, fp32 elsewhere
DEVICES = ("auto", "cuda", "mps", "cpu")  # auto: cuda, else cpu
#: LAION-400M kept pairs with cosine >= 0.28 under OpenAI ViT-B/32.
LAION_THRESHOLD = 0.28


@dataclass(frozen=True)
class ScorerConfig:
    """Where the open_clip model is and how it runs (see ``scorer.load_scorer``).

    path: an open_clip folder (``open_clip_config.json`` + weights, the layout hubs publish), or a
        weight file (.safetensors; .bin/.pt/.pth read with ``weights_only``) together with ``arch``.
    arch: an open_clip architecture name (``ViT-B-32``, ``ViT-L-14``) for a bare weight file; empty
        for a folder.
    batch_size: images per forward pass.
    """

    path: str
    arch: str = ""
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if not isinstance(self.path, str) or not self.path.strip():
            raise invalid("path", self.path, "an open_clip folder or a weight file",
                          "Pick a model from models/clip")
        if not isinstance(self.arch, str):
            raise invalid("arch", self.arch, "an open_clip architecture name such as 'ViT-B-32', or ''")
        for name, allowed in (("device", DEVICES), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise invalid(name, getattr(self, name), allowed)
        check_int("batch_size", self.batch_size, 1, 65536)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FilterConfig:
    """How scores and basic checks decide ``keep`` (modes are the ``select.MODES`` registry).

    mode: "threshold" (score >= threshold), "keep_fraction" (the best ``keep_fraction`` of each
        skill, rounded up), "top_k_per_prompt" (the ``top_k`` best images of each prompt),
        "per_skill" (``per_skill[skill]``, else ``threshold`` when given).
    floor: in every mode, scores below it are dropped (None: no floor).
    min_pixel_std: images whose grey-level standard deviation (0..255) is below it are blank.
    max_caption_tokens: captions longer than this (BPE tokens, without start/end) are dropped;
        0: the model's context length minus 2 (77 -> 75), past which CLIP would truncate.
    dedup_cosine: two images of one skill whose embeddings have a cosine above it are near
        duplicates; the lower-scoring is dropped. 0 disables the check.
    """

    mode: str = "threshold"
    threshold: float | None = None
    keep_fraction: float | None = None
    top_k: int | None = None
    floor: float | None = None
    per_skill: tuple[tuple[str, float], ...] = ()
    min_pixel_std: float = 2.0
    max_caption_tokens: int = 0
    dedup_cosine: float = 0.97

    def __post_init__(self) -> None:
        from .select import MODES

        MODES.get(self.mode)  # raises naming the registered modes
        if isinstance(self.per_skill, Mapping):
            object.__setattr__(self, "per_skill", tuple(sorted(self.per_skill.items())))
        for name in ("threshold", "floor"):
            value = getattr(self, name)
            if value is not None:
                _cosine(name, value)
                object.__setattr__(self, name, float(value))
        if self.keep_fraction is not None:
            f = self.keep_fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                raise invalid("keep_fraction", f, "a number in (0, 1]", "0.3 keeps the best 30% of each skill")
            object.__setattr__(self, "keep_fraction", float(f))
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1, 100_000)
        self._check_per_skill()
        check_number("min_pixel_std", self.min_pixel_std, 0, 255)
        check_int("max_caption_tokens", self.max_caption_tokens, 0, 100_000)
        check_number("dedup_cosine", self.dedup_cosine, 0, 1)
        needs = {"threshold": "threshold", "keep_fraction": "keep_fraction", "top_k_per_prompt": "top_k"}
        field = needs.get(self.mode)
        if field and getattr(self, field) is None:
            raise invalid(field, None, f"a value: mode {self.mode!r} needs it")
        if self.mode == "per_skill" and not self.per_skill:
            raise invalid("per_skill", {}, "at least one skill=threshold pair", "e.g. {'spatial': 0.3}")

    def _check_per_skill(self) -> None:
        pairs = self.per_skill
        ok = isinstance(pairs, tuple) and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                              and p[0].strip() for p in pairs)
        if not ok:
            raise invalid("per_skill", pairs, "a mapping of skill id -> cosine threshold")
        for skill, value in pairs:
            _cosine(f"per_skill[{skill!r}]", value)
        object.__setattr__(self, "per_skill", tuple((s, float(v)) for s, v in pairs))

    def skill_threshold(self, skill: str) -> float | None:
        """The threshold of ``skill`` in per_skill mode: its own, else ``threshold`` (None: none given)."""
        return dict(self.per_skill).get(skill, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_skill"] = dict(self.per_skill)
        return d



def _cosine(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
        # CLIPScore (Hessel et al.) is 2.5 * max(cos, 0), often shown x100: a value above 1 is one of those.
        raise invalid(name, value, "a cosine similarity from -1 to 1",
                      f"scores here are raw cosines (LAION kept >= {LAION_THRESHOLD} with ViT-B/32); "
                      "divide a CLIPScore by 2.5 (and by 100 if it is a percentage)")


def parse_per_skill(text: str, field: str = "per_skill") -> dict[str, float]:
    """``"spatial=0.3, countbench=0.25"`` (commas or new lines) -> {"spatial": 0.3, "countbench": 0.25}.

    Shared by the CLI (``--per-skill``) and the node's text field; empty text gives {}.
    """
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.replace("\n", ",").split(","))):
        skill, sep, value = part.partition("=")
        try:
            if not sep or not skill.strip():
                raise ValueError(part)
            out[skill.strip()] = float(value)
        except ValueError:
            raise invalid(field, text, "skill=threshold pairs separated by commas",
                          "e.g. spatial=0.3,countbench=0.25") from None
    return out
