"""How exact is the judge? Compare its answers with the ground truth of rendered scenes.

For each random scene (a prompt of a random world skill, a scene drawn for it, rendered), every
question of the prompt's spec and of a *mismatched* spec (one fact changed: a count, a colour, a
shape, a size, the relation or the background) is answered twice: by the judge on the image, and by
the same rules on the scene's ground truth (:func:`ground_truth`). Agreement is reported per question
kind, with the share of "no" answers (the mismatched specs make the test two-sided), the shape and
colour confusion counts, and the judge's time per image.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from typing import Any

import numpy as np

from ..errors import SelmaError
from .judge import Detection, Detections, JudgeConfig, answer, detect, questions_for
from .scene import Scene, render_scene, sample_scene
from .skills import WORLD_SKILLS
from .spec import BACKGROUNDS, COLOURS, INVERSE, MAX_COUNT, SHAPES, SIZES, PromptSpec


def ground_truth(scene: Scene) -> Detections:
    """The detections a perfect judge would return for ``scene``."""
    return Detections(scene.background, tuple(Detection(o.shape, o.colour, o.size, o.side, o.x, o.y, 0.0)
                                              for o in scene.objects))


def _change(spec: PromptSpec, rng: random.Random) -> PromptSpec:
    i = rng.randrange(len(spec.entities))
    e = spec.entities[i]
    what = rng.choice(("count", "colour", "shape", "size", "relation", "background"))
    new_e, rel, bg = e, spec.relation, spec.background
    if what == "count":
        new_e = dataclasses.replace(e, count=rng.choice([c for c in range(1, MAX_COUNT + 1) if c != e.count]), numbered=True)
    elif what == "colour":
        new_e = dataclasses.replace(e, colour=rng.choice([c for c in COLOURS if c != e.colour]))
    elif what == "shape":
        new_e = dataclasses.replace(e, shape=rng.choice([s for s in SHAPES if s != e.shape]))
    elif what == "size":
        new_e = dataclasses.replace(e, size=rng.choice([s for s in SIZES if s != e.size]))
    elif what == "relation" and rel is not None:
        rel = dataclasses.replace(rel, relation=rng.choice([INVERSE[rel.relation], *(r for r in INVERSE if r != rel.relation)]))
    else:
        bg = rng.choice([b for b in BACKGROUNDS if b != spec.background])
    ents = spec.entities[:i] + (new_e,) + spec.entities[i + 1:]
    return PromptSpec(ents, rel, bg)


def mismatched_spec(spec: PromptSpec, rng: random.Random) -> PromptSpec:
    """``spec`` with one fact changed (a valid spec; retried until the change is allowed)."""
    for _ in range(100):
        try:
            return _change(spec, rng)
        except SelmaError:
            continue
    return dataclasses.replace(spec, background=rng.choice([b for b in BACKGROUNDS if b != spec.background]))


def _nearest(found: Detections, o: Any) -> Detection | None:
    return min(found.objects, key=lambda d: (d.x - o.x) ** 2 + (d.y - o.y) ** 2, default=None)


def measure_judge(n: int, resolution: int = 64, seed: int = 0, noise: float = 0.0,
                  config: JudgeConfig | None = None) -> dict[str, Any]:
    """Judge ``n`` random scenes at ``resolution`` (Gaussian pixel ``noise`` sigma, 0..255) against ground truth."""
    config = config or JudgeConfig()
    rng = random.Random(f"selma-world-measure:{seed}")
    nrng = np.random.default_rng(seed)
    total: Counter[str] = Counter()
    right: Counter[str] = Counter()
    noes: Counter[str] = Counter()
    shapes: Counter[tuple[str, str]] = Counter()
    colours: Counter[tuple[str, str]] = Counter()
    counts_right = 0
    judge_s = 0.0
    skills = WORLD_SKILLS.names()
    for _ in range(n):
        spec = WORLD_SKILLS.get(rng.choice(skills)).sample(rng)
        scene = sample_scene(spec, rng)
        image = np.asarray(render_scene(scene, resolution), dtype=np.float32)
        if noise:
            image = image + nrng.normal(0.0, noise, image.shape)
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        t0 = time.perf_counter()
        found = detect(image, config)
        judge_s += time.perf_counter() - t0
        truth = ground_truth(scene)
        counts_right += len(found.objects) == len(scene.objects)
        for o in scene.objects:
            d = _nearest(found, o)
            shapes[(o.shape, d.shape if d else "-")] += 1
            colours[(o.colour, d.colour if d else "-")] += 1
        for s in (spec, mismatched_spec(spec, rng)):
            for q in questions_for(s):
                expected = answer(q, s, truth, config.margin)
                total[q.kind] += 1
                noes[q.kind] += not expected
                right[q.kind] += answer(q, s, found, config.margin) == expected
    return {
        "scenes": n, "resolution": resolution, "noise": noise,
        "questions": sum(total.values()), "accuracy": sum(right.values()) / sum(total.values()),
        "by_kind": {k: {"questions": total[k], "accuracy": right[k] / total[k], "no_share": noes[k] / total[k]}
                    for k in sorted(total)},
        "object_count_exact": counts_right / n,
        "shape_confusion": {f"{a}->{b}": c for (a, b), c in sorted(shapes.items())},
        "colour_confusion": {f"{a}->{b}": c for (a, b), c in sorted(colours.items())},
        "judge_ms_per_image": 1000 * judge_s / n,
    }
