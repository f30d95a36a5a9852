"""Data-driven merge weights: try a few weight vectors on held-out prompts and keep the best.

For each candidate ``w`` (a point of the probability simplex: non-negative, summing to 1), the experts
are merged in memory with ``w`` (the configured method), the merged LoRA is put on the base pipeline,
every held-out prompt of every skill is rendered with the same seed for every candidate (a paired
comparison), and a scorer rates image-prompt agreement (S3's CLIP cosine; any ``Score`` works). A
candidate's score is the mean over skills of each skill's mean score, so every skill counts the same
however many prompts it has. The best candidate is the one with the highest score; the table lists
every candidate with its per-skill scores.

Budget: ``SearchConfig.budget`` candidates, in this order: uniform ``1/N`` (SELMA's merge), the points
of the simplex grid with step ``1/grid`` nearest to it first (each one step of weight moved between two
experts), then the rest of the grid in a seeded order. Rendering dominates: a candidate costs one
merge plus ``prompts x steps`` UNet calls.

    result = search_weights(experts, MergeConfig(method="svd", rank=32), SearchConfig(budget=6),
                            heldout, render=diffusers_renderer(pipe, steps=20), score=clip_score(scorer))
    result.best, result.text(), result.to_dict()
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import SelmaError, invalid
from .config import MergeConfig
from .files import Expert, load_experts, merge_experts

#: render(kohya LoRA tensors, prompts, seeds) -> one image per prompt (PIL)
Render = Callable[[dict, Sequence[str], Sequence[int]], list]
#: score(images, prompts) -> one number per image, higher is better
Score = Callable[[list, Sequence[str]], list[float]]


@dataclass(frozen=True)
class SearchConfig:
    """How hard to search. budget: candidates rendered (uniform included); grid: weights are multiples of
    ``1/grid``; steps/size/guidance: the renders; max_prompts: per skill (the first ones); seed: the renders'
    seeds (``seed + prompt index``) and the order of the farther grid points."""

    budget: int = 6
    grid: int = 4
    steps: int = 20
    size: int = 0  # 0: the model's default
    guidance: float = 7.5
    max_prompts: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name, lo, hi in (("budget", 1, 1000), ("grid", 1, 100), ("steps", 1, 1000), ("size", 0, 8192),
                             ("max_prompts", 1, 10_000), ("seed", 0, 2**31 - 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise invalid(name, v, f"an integer from {lo} to {hi}")
        if self.size % 8:
            raise invalid("size", self.size, "0 or a multiple of 8")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or self.guidance < 0:
            raise invalid("guidance", self.guidance, "a number >= 0")


@dataclass
class SearchResult:
    """Every candidate tried, its per-skill and overall scores, and the best."""

    skills: list[str]
    candidates: list[tuple[float, ...]]
    per_skill: list[dict[str, float]]
    scores: list[float]
    experts: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def best_index(self) -> int:
        return max(range(len(self.scores)), key=lambda i: (self.scores[i], -i))  # first of equal bests

    @property
    def best(self) -> tuple[float, ...]:
        return self.candidates[self.best_index]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(best=list(self.best), best_index=self.best_index, best_score=self.scores[self.best_index])
        return d

    def text(self) -> str:
        head = "  ".join(f"{n[:10]:>10}" for n in self.experts) or "weights"
        lines = [f"weight search: {len(self.candidates)} candidates, {len(self.skills)} skills "
                 f"({self.elapsed_s:.1f} s); score = mean over skills of mean CLIP cosine",
                 f"  {head}  | " + "  ".join(f"{s[:10]:>10}" for s in self.skills) + "  |      score"]
        for i, (w, per, sc) in enumerate(zip(self.candidates, self.per_skill, self.scores, strict=True)):
            mark = " <- best" if i == self.best_index else ""
            lines.append("  " + "  ".join(f"{x:>10.3f}" for x in w) + "  | "
                         + "  ".join(f"{per[s]:>10.4f}" for s in self.skills) + f"  | {sc:>10.4f}{mark}")
        return "\n".join(lines)


def simplex_candidates(n: int, grid: int, budget: int, seed: int = 0) -> list[tuple[float, ...]]:
    """Up to ``budget`` weight vectors on the simplex: uniform first, then grid points by distance to it."""
    if n < 1:
        raise invalid("experts", n, "at least one expert")
    uniform = tuple([1.0 / n] * n)
    points = [tuple(c / grid for c in combo) for combo in _compositions(grid, n)]
    rng = random.Random(seed)
    rng.shuffle(points)  # a seeded order among equally near points
    points.sort(key=lambda p: sum((a - b) ** 2 for a, b in zip(p, uniform, strict=True)))
    out = [uniform]
    for p in points:
        if len(out) >= budget:
            break
        if all(max(abs(a - b) for a, b in zip(p, q, strict=True)) > 1e-12 for q in out):
            out.append(p)
    return out


def _compositions(total: int, parts: int):
    """All tuples of ``parts`` non-negative integers summing to ``total`` (stars and bars)."""
    for bars in itertools.combinations(range(total + parts - 1), parts - 1):
        edges = (-1, *bars, total + parts - 1)
        yield tuple(edges[i + 1] - edges[i] - 1 for i in range(parts))


def search_weights(
    experts: Sequence[Expert],
    config: MergeConfig,
    search: SearchConfig,
    heldout: Mapping[str, Sequence[str]],
    *,
    render: Render,
    score: Score,
    progress: Callable[[int, int], None] | None = None,
) -> SearchResult:
    """Merge, render and score each candidate weight vector; see the module doc."""
    heldout = {s: list(p)[: search.max_prompts] for s, p in heldout.items() if list(p)}
    if not heldout:
        raise invalid("heldout", {}, "at least one skill with prompts", "e.g. counting=heldout/counting.jsonl")
    start = time.perf_counter()
    candidates = simplex_candidates(len(experts), search.grid, search.budget, search.seed)
    skills = sorted(heldout)
    per_skill, scores = [], []
    for i, w in enumerate(candidates):
        tensors, _ = merge_experts(experts, replace(config, weights=w))
        row = {}
        for skill in skills:
            prompts = heldout[skill]
            seeds = [search.seed + j for j in range(len(prompts))]
            values = score(render(tensors, prompts, seeds), prompts)
            if len(values) != len(prompts):
                raise SelmaError(f"the scorer returned {len(values)} scores for {len(prompts)} images")
            row[skill] = float(sum(values) / len(values))
        per_skill.append(row)
        scores.append(sum(row.values()) / len(row))
        if progress is not None:
            progress(i + 1, len(candidates))
    return SearchResult(skills, candidates, per_skill, scores, [e.name for e in experts],
                        time.perf_counter() - start)


# --- the real renderer and scorer ---------------------------------------------------------------------------


def diffusers_renderer(pipe: Any, *, steps: int, size: int = 0, guidance: float = 7.5) -> Render:
    """Render with a diffusers SD pipeline and the merged LoRA loaded as a temporary adapter."""
    import torch

    def render(tensors: dict, prompts: Sequence[str], seeds: Sequence[int]) -> list:
        pipe.load_lora_weights({k: v.clone() for k, v in tensors.items()}, adapter_name="selma_search")
        try:
            kwargs = {"width": size, "height": size} if size else {}
            with torch.no_grad():
                return pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance,
                            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="pil",
                            **kwargs).images
        finally:
            pipe.delete_adapters("selma_search")

    return render


def clip_score(scorer: Any) -> Score:
    """CLIP cosine of each image with its prompt (S3's :class:`~..filter.scorer.ClipScorer`)."""
    import torch

    def score(images: list, prompts: Sequence[str]) -> list[float]:
        pixels = torch.stack([scorer.preprocess(im.convert("RGB")) for im in images])
        return (scorer.embed_pixels(pixels) * scorer.embed_texts(list(prompts))).sum(-1).tolist()

    return score


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Held-out prompts: a JSONL file (``prompt`` of each line, the stage-1 format) or one prompt a line."""
    path = Path(path)
    if not path.is_file():
        raise SelmaError(f"{path}: no such prompt file")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix.lower() != ".jsonl":
        return lines
    try:
        return [json.loads(ln)["prompt"] for ln in lines]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SelmaError(f"{path}: not a prompts JSONL file (each line an object with 'prompt'): {e}") from e


def parse_heldout(text: str) -> dict[str, list[str]]:
    """``"counting=a.jsonl,spatial=b.txt"`` -> {skill: prompts}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        skill, sep, path = part.partition("=")
        if not sep or not skill.strip() or not path.strip():
            raise invalid("--heldout", text, "skill=file pairs separated by commas", "e.g. counting=heldout/c.jsonl")
        out[skill.strip()] = read_prompts(path.strip())
    return out


def search_weights_cli(paths: Sequence[str], config: MergeConfig, search: SearchConfig, *, model: str,
                       heldout: Mapping[str, Sequence[str]], clip: str, clip_arch: str = "", device: str = "auto",
                       base: str | None = None) -> SearchResult:
    """Load the experts, the base pipeline and the CLIP scorer, search, release both models."""
    from ..filter.config import ScorerConfig
    from ..filter.scorer import load_scorer
    from ..models.config import ModelConfig
    from ..models.loader import load_pipeline

    experts = load_experts(paths, base=base)
    scorer_config = ScorerConfig(path=clip, arch=clip_arch, device=device)  # checked before the big load
    loaded = load_pipeline(ModelConfig(path=model, device=device))
    try:
        with load_scorer(scorer_config) as scorer:
            return search_weights(experts, config, search, heldout,
                                  render=diffusers_renderer(loaded.pipe, steps=search.steps, size=search.size,
                                                            guidance=search.guidance),
                                  score=clip_score(scorer))
    finally:
        loaded.release()
