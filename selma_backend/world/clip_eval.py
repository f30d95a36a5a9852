"""How well does a CLIP model see the world? Minimal-pair retrieval and agreement with the exact judge.

Both measures use HELD-OUT prompts only (:func:`.skills.split_of`), so a world CLIP is never scored
on a meaning it was trained on, and load the model through :func:`selma_backend.filter.load_scorer`
exactly as stage 3 does.

(a) Retrieval per alteration kind (:data:`.alter.EVAL_ALTERATIONS`): an image of a held-out prompt,
its true caption and one to three captions in the same words with one fact of that kind changed
(a count, the relation, two colours swapped, a shape), each checked false on the scene. A hit is the
true caption scoring strictly highest; chance is the mean of 1 / (1 + alternatives).

(b) Rank agreement: each image is scored against its true caption and captions with one, two and
three facts changed (:func:`.measure.mismatched_spec`) by CLIP (cosine) and by the judge (DSG share
of questions passed, detections found once per image). Reported: Spearman's rho over all pairs
(ties get average ranks) and its mean within images.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SelmaError, check_int
from .alter import EVAL_ALTERATIONS, alterations, false_on, minimal_pair
from .captions import caption
from .judge import JudgeConfig, detect, judge_detections
from .measure import mismatched_spec
from .scene import Scene, render_scene, sample_scene
from .skills import WORLD_SKILLS, world_prompts
from .spec import PromptSpec

MAX_ALTERNATIVES = 3
CHAIN = 3  # captions with 1..CHAIN facts changed, for the rank agreement
#: The world CLIP shipped with the pack (``selma world train-clip``; see its README.md).
WORLD_CLIP = Path(__file__).resolve().parent / "assets" / "world-clip"


def heldout_specs(n: int, seed: int) -> list[PromptSpec]:
    """``n`` held-out specs of every world skill, interleaved (skill 1, skill 2, ..., skill 1, ...)."""
    per_skill = [[PromptSpec.from_dict(r["spec"]) for r in world_prompts(s, n, seed=seed, split="heldout")]
                 for s in WORLD_SKILLS.names()]
    return [specs[i] for i in range(n) for specs in per_skill]


def spearman(x: Any, y: Any) -> float:
    """Spearman's rho with average ranks for ties; 0.0 when either side is constant."""
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    top = np.cumsum(counts)  # 1-based rank of each distinct value's last copy
    return (top - (counts - 1) / 2)[inverse]


def _scene(spec: PromptSpec, rng: random.Random) -> Scene | None:
    try:
        return sample_scene(spec, rng)
    except SelmaError:  # the sampler found no room (rare): the spec is skipped
        return None


def _embed(scorer: Any, images: list[Any], texts: list[str]) -> tuple[Any, Any]:
    import torch

    img = torch.cat([scorer.embed_pixels(torch.stack([scorer.preprocess(im) for im in images[i:i + 64]]))
                     for i in range(0, len(images), 64)])
    return img, scorer.embed_texts(texts)


def retrieval(scorer: Any, specs: list[PromptSpec], kind: str, n: int, resolution: int, seed: int) -> dict[str, Any]:
    """Minimal-pair retrieval for one alteration kind on up to ``n`` specs that allow it."""
    rng = random.Random(f"selma-world-clip-eval:{kind}:{seed}")
    images, groups, texts = [], [], []
    for spec in specs:
        if len(images) == n:
            break
        scene = _scene(spec, rng)
        if scene is None:
            continue
        wrong = false_on(alterations(spec, kind), scene)
        if not wrong:
            continue
        wrong = rng.sample(wrong, min(MAX_ALTERNATIVES, len(wrong)))
        true_text, wrong_texts = minimal_pair(spec, wrong, rng.getrandbits(32))
        groups.append((len(texts), len(wrong_texts)))
        texts += [true_text, *wrong_texts]
        images.append(render_scene(scene, resolution))
    if not images:
        return {"n": 0, "accuracy": 0.0, "chance": 0.0, "alternatives": 0.0}
    img, txt = _embed(scorer, images, texts)
    hits, chance = 0, 0.0
    for i, (start, k) in enumerate(groups):
        sims = (txt[start:start + 1 + k] @ img[i]).tolist()
        hits += sims[0] > max(sims[1:])
        chance += 1 / (1 + k)
    return {"n": len(images), "accuracy": hits / len(images), "chance": chance / len(images),
            "alternatives": sum(k for _, k in groups) / len(groups)}


def rank_agreement(scorer: Any, specs: list[PromptSpec], n: int, resolution: int, seed: int) -> dict[str, Any]:
    """Spearman between CLIP cosine and the judge's score over images x partially matching captions."""
    rng = random.Random(f"selma-world-clip-eval:rank:{seed}")
    config = JudgeConfig()
    images, texts, judged, owner = [], [], [], []
    for spec in specs:
        if len(images) == n:
            break
        scene = _scene(spec, rng)
        if scene is None:
            continue
        image = render_scene(scene, resolution)
        found = detect(image, config)
        chain = [spec]
        for _ in range(CHAIN):
            chain.append(mismatched_spec(chain[-1], rng))
        cap_seed = rng.getrandbits(32)
        for s in chain:
            texts.append(caption(s, random.Random(cap_seed)))
            judged.append(judge_detections(found, s, config).score)
            owner.append(len(images))
        images.append(image)
    img, txt = _embed(scorer, images, texts)
    clip = [float(txt[t] @ img[owner[t]]) for t in range(len(texts))]
    per_image = []
    for i in range(len(images)):
        idx = [t for t in range(len(texts)) if owner[t] == i]
        if len({judged[t] for t in idx}) > 1:
            per_image.append(spearman([clip[t] for t in idx], [judged[t] for t in idx]))
    return {"images": len(images), "pairs": len(texts), "spearman": spearman(clip, judged),
            "spearman_within_image": float(np.mean(per_image)) if per_image else 0.0,
            "judge_mean": float(np.mean(judged))}


def evaluate_clip(folder: str | os.PathLike[str] = WORLD_CLIP, n: int = 100, seed: int = 0) -> dict[str, Any]:
    """(a) minimal-pair retrieval per alteration kind and (b) CLIP-judge rank agreement, held-out prompts."""
    import json

    from ..filter import ScorerConfig, load_scorer

    check_int("n", n, 1, 100_000)
    start = time.perf_counter()
    folder = Path(folder)
    cfg = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    resolution = int(cfg["model_cfg"]["vision_cfg"]["image_size"])
    specs = heldout_specs(n, seed)
    with load_scorer(ScorerConfig(str(folder), device="cpu", dtype="fp32")) as scorer:
        kinds = {kind: retrieval(scorer, specs, kind, n, resolution, seed) for kind in EVAL_ALTERATIONS}
        rank = rank_agreement(scorer, specs, n, resolution, seed)
    return {"model": str(folder), "n": n, "seed": seed, "resolution": resolution, "retrieval": kinds,
            "rank_agreement": rank, "seconds": round(time.perf_counter() - start, 1)}


def format_table(result: dict[str, Any]) -> str:
    """The evaluation as a plain-text table."""
    lines = [f"world CLIP {result['model']}  (held-out prompts, seed {result['seed']}, {result['resolution']} px)",
             f"{'alteration':<14}{'n':>6}{'alts':>7}{'accuracy':>10}{'chance':>9}"]
    for kind, r in result["retrieval"].items():
        lines.append(f"{kind:<14}{r['n']:>6}{r['alternatives']:>7.2f}{r['accuracy']:>10.3f}{r['chance']:>9.3f}")
    ra = result["rank_agreement"]
    lines.append(f"Spearman(CLIP, judge): {ra['spearman']:.3f} over {ra['pairs']} pairs of {ra['images']} images; "
                 f"mean within image {ra['spearman_within_image']:.3f}")
    return "\n".join(lines)
