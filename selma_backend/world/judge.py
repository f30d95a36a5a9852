"""The world's exact judge: find the shapes in an image and answer DSG-style questions about a prompt.

Detection (:func:`detect`): pixels are assigned to palette colours along background-to-colour
segments (:mod:`.segment`), split into 4-connected blobs, and blobs smaller than ``min_area`` are
dropped. Each blob's shape is found by analysis by synthesis: for every candidate shape, the shape
with the blob's exact area (summed coverage) and centroid is drawn the way the renderer draws it,
and the candidate whose coverage map differs least from the blob's wins. Its box side gives the size
class (``SIZE_THRESHOLD``) and its box centre the position used for relations.

Questions (:func:`questions_for`) follow Davidsonian Scene Graph (Cho et al., ICLR 2024): one entity
question per entity, then colour/size attributes and exact counts depending on it, relations
depending on both entities, and the background as a global question. A question whose parent is
answered "no" counts as "no" (:func:`selma_backend.eval.dsg.propagate`); the prompt's score is the
share of questions passed. Captions are scored by text alone through :func:`.captions.parse_caption`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from ..errors import invalid
from .scene import relation_holds, shape_points
from .segment import as_array, blob_features, classify_pixels, components, estimate_background, soft_mask
from .spec import PLURALS, SHAPES, SIZE_THRESHOLD, Entity, PromptSpec

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class JudgeConfig:
    """``tol``: how far (0..255 RGB distance) a pixel may lie from a background-to-colour segment;
    ``min_area``: least blob area, fraction of the image; ``margin``: least centre distance for a
    relation, fraction of the image side; ``supersample``: the renderer's, used for shape templates."""

    tol: float = 60.0  # exact renders need any tol > 2; 60 also keeps JPEG (q75) and noisy images judgeable
    min_area: float = 0.004
    margin: float = 0.05
    supersample: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.tol <= 255:
            raise invalid("tol", self.tol, "a number in (0, 255]")
        if not 0 < self.min_area < 0.5:
            raise invalid("min_area", self.min_area, "a fraction of the image in (0, 0.5)")
        if not 0 <= self.margin < 0.5:
            raise invalid("margin", self.margin, "a fraction of the image side in [0, 0.5)")
        if isinstance(self.supersample, bool) or not isinstance(self.supersample, int) or not 1 <= self.supersample <= 8:
            raise invalid("supersample", self.supersample, "an integer from 1 to 8")


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    size: str
    side: float  # fitted box side, fraction of the image side
    x: float  # fitted box centre, fractions of the image side
    y: float
    fit_error: float  # |coverage - template| summed, over the blob's area: 0 is a perfect fit

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("shape", "colour", "size", "side", "x", "y", "fit_error")}


@dataclass(frozen=True)
class Detections:
    background: str
    objects: tuple[Detection, ...]

    def matching(self, e: Entity) -> list[Detection]:
        return [d for d in self.objects if e.matches(d.shape, d.colour, d.size)]


# --- shapes by analysis by synthesis -------------------------------------------------------------------


@cache
def shape_geometry(shape: str) -> tuple[float, float]:
    """(area over box area, centroid's offset below the box centre over the side) of a drawn shape."""
    if shape == "circle":
        return math.pi / 4, 0.0
    pts = np.array(shape_points(shape, 0.0, 0.0, 1.0))
    x, y = pts[:, 0], pts[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    cy = ((y + yn) * cross).sum() / (6 * area)
    return float(abs(area)), float(cy)


def _template(shape: str, cx: float, cy: float, side: float, box: tuple[int, int, int, int], ss: int) -> np.ndarray:
    """Coverage (h, w) in [0, 1] of ``shape`` (box centre cx, cy, side; pixels) over window ``box``."""
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = box
    im = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(im)
    px, py, s = (cx - x0) * ss, (cy - y0) * ss, side * ss
    if shape == "circle":
        draw.ellipse([px - s / 2, py - s / 2, px + s / 2, py + s / 2], fill=255)
    else:
        draw.polygon(shape_points(shape, px, py, s), fill=255)
    if ss > 1:
        im = im.resize((x1 - x0, y1 - y0), Image.BOX)
    return np.asarray(im, dtype=np.float32) / 255.0


def fit_shape(weights: np.ndarray, coverage: float, cx: float, cy: float, box: tuple[int, int, int, int],
              ss: int) -> tuple[str, float, float, float, float]:
    """(shape, side, box centre x, y, error) of the candidate that best explains a blob's coverage map."""
    x0, y0, x1, y1 = box
    observed = weights[y0:y1, x0:x1]
    best: tuple[str, float, float, float, float] | None = None
    for shape in SHAPES:
        fill, offset = shape_geometry(shape)
        side = math.sqrt(coverage / fill)
        by = cy - offset * side
        err = float(np.abs(observed - _template(shape, cx, by, side, box, ss)).sum() / coverage)
        if best is None or err < best[4]:
            best = (shape, side, cx, by, err)
    assert best is not None
    return best


def detect(image: Any, config: JudgeConfig | None = None) -> Detections:
    """Every shape in ``image`` (PIL or (H, W, 3) uint8) and the background's name."""
    config = config or JudgeConfig()
    img = as_array(image)
    h, w = img.shape[:2]
    bg, bg_name = estimate_background(img)
    labels, t, resid = classify_pixels(img, bg, config.tol)
    found = []
    for colour, members in components(labels):
        blob = blob_features(colour, members, (h, w), t, resid, config.tol)
        if blob.coverage < config.min_area * h * w:
            continue
        weights = soft_mask(colour, members, (h, w), t, resid, config.tol)
        shape, side, bx, by, err = fit_shape(weights, blob.coverage, blob.cx, blob.cy, blob.box, config.supersample)
        side_frac = side / w
        found.append(Detection(shape, blob.colour, "large" if side_frac > SIZE_THRESHOLD else "small",
                               round(side_frac, 4), round(bx / w, 4), round(by / h, 4), round(err, 4)))
    return Detections(bg_name, tuple(found))


# --- questions ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldQuestion:
    """A DSG question with the check that answers it on detections.

    ``kind``: entity | colour | size | count | relation | background; ``args``: entity indices, or
    (subject, relation, object) for a relation, or the background's name."""

    id: int
    category: str  # a selma_backend.eval.dsg category
    text: str
    parents: tuple[int, ...]
    kind: str
    args: tuple[Any, ...]

    def to_dsg(self) -> Any:
        from ..eval.dsg import Question

        return Question(self.id, self.category, self.text, self.parents)


def noun(e: Entity, *, size: bool = True, colour: bool = True) -> str:
    """"small red circle" / "red circles": the entity's words after the article or number."""
    words = [e.size if size else None, e.colour if colour else None, PLURALS[e.shape] if e.count > 1 else e.shape]
    return " ".join(w for w in words if w)


def questions_for(spec: PromptSpec) -> list[WorldQuestion]:
    """The DSG questions of a spec: entities, their attributes and counts, the relation, the background."""
    qs: list[WorldQuestion] = []

    def add(category: str, text: str, parents: tuple[int, ...], kind: str, args: tuple[Any, ...]) -> int:
        qs.append(WorldQuestion(len(qs) + 1, category, text, parents, kind, args))
        return len(qs)

    entity_q = []
    for i, e in enumerate(spec.entities):
        bare = noun(e, size=False, colour=False)
        many = e.count > 1
        entity_q.append(add("entity", f"Are there {bare}?" if many else f"Is there a {bare}?", (), "entity", (i,)))
        if e.colour:
            add("attribute", f"Are the {bare} {e.colour}?" if many else f"Is the {bare} {e.colour}?",
                (entity_q[i],), "colour", (i,))
        if e.size:
            add("attribute", f"Are the {noun(e, size=False)} {e.size}?" if many else f"Is the {noun(e, size=False)} {e.size}?",
                (entity_q[i],), "size", (i,))
        if e.numbered:
            verb = "Are" if many else "Is"
            add("count", f"{verb} there exactly {NUMBER_WORDS[e.count]} {noun(e)}?", (entity_q[i],), "count", (i,))
    r = spec.relation
    if r is not None:
        a, b = spec.entities[r.subject], spec.entities[r.object]
        rel = "to the " + r.relation if r.relation in ("left of", "right of") else r.relation
        add("relation", f"Is the {noun(a)} {rel} the {noun(b)}?", (entity_q[r.subject], entity_q[r.object]),
            "relation", (r.subject, r.relation, r.object))
    if spec.background:
        add("global", f"Is the background {spec.background}?", (), "background", (spec.background,))
    return qs


def answer(q: WorldQuestion, spec: PromptSpec, found: Detections, margin: float) -> bool:
    """The raw yes/no answer of one question on detections (dependencies not yet applied)."""
    if q.kind == "background":
        return found.background == q.args[0]
    if q.kind == "relation":
        s, rel, o = q.args
        subs, objs = found.matching(spec.entities[s]), found.matching(spec.entities[o])
        return any(relation_holds(rel, (a.x, a.y), (b.x, b.y), margin) for a in subs for b in objs if a is not b)
    e = spec.entities[q.args[0]]
    if q.kind == "entity":
        return any(d.shape == e.shape for d in found.objects)
    if q.kind == "colour":
        return any(d.shape == e.shape and d.colour == e.colour for d in found.objects)
    if q.kind == "size":
        return any(d.shape == e.shape and e.colour in (None, d.colour) and d.size == e.size for d in found.objects)
    if q.kind == "count":
        return len(found.matching(e)) == e.count
    raise invalid("question kind", q.kind, ["entity", "colour", "size", "count", "relation", "background"])


@dataclass
class JudgeResult:
    spec: PromptSpec
    detections: Detections
    questions: list[WorldQuestion]
    answers: dict[int, bool]  # raw answers
    passed: dict[int, bool]  # after DSG's dependency rule
    score: float
    categories: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "background": self.detections.background,
                "detections": [d.to_dict() for d in self.detections.objects],
                "questions": [{"id": q.id, "category": q.category, "kind": q.kind, "text": q.text,
                               "parents": list(q.parents), "answer": self.answers[q.id], "passed": self.passed[q.id]}
                              for q in self.questions],
                "score": self.score, "categories": self.categories}


def judge(image: Any, prompt: PromptSpec | str, config: JudgeConfig | None = None) -> JudgeResult:
    """Score ``image`` against a world prompt (its spec, or its caption text)."""
    from .captions import parse_caption

    config = config or JudgeConfig()
    spec = parse_caption(prompt) if isinstance(prompt, str) else prompt
    return judge_detections(detect(image, config), spec, config)


def judge_detections(found: Detections, spec: PromptSpec, config: JudgeConfig | None = None) -> JudgeResult:
    """Score detections (of one image, found once) against a spec: what :func:`judge` does after detecting."""
    from ..eval.dsg import dsg_scores, propagate

    config = config or JudgeConfig()
    qs = questions_for(spec)
    raw = {q.id: answer(q, spec, found, config.margin) for q in qs}
    dsg = [q.to_dsg() for q in qs]
    passed = propagate(dsg, raw)
    score, categories = dsg_scores(dsg, passed)
    return JudgeResult(spec, found, qs, raw, passed, score, categories)
