"""Scenes of the world: what is in an image (ground truth), how to sample one for a spec, how to draw it.

A :class:`Scene` lists every object with its shape, colour, size class, exact box side and centre
(fractions of the image side, so one scene renders at any resolution). Objects' boxes never touch
(a gap of ``GAP`` between them, ``MARGIN`` from the border), so every object is one connected blob
and counting is exact. Drawing is anti-aliased by rendering at ``supersample`` times the resolution
and averaging boxes of pixels down (Pillow's BOX filter): an edge pixel is a mix of one shape colour
and the background, which the judge undoes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from ..errors import SelmaError, invalid
from .spec import BACKGROUNDS, COLOURS, COMMON_COLOURS, SHAPES, SIZE_RANGES, SIZES, PromptSpec, Relation

MARGIN = 0.03  # free border around the image, fraction of the side
GAP = 0.08  # least distance between two objects' boxes (x or y), fraction of the side
REL_MAIN = 0.2  # a relation's centres differ by at least this along its axis ...
REL_CROSS = 0.5  # ... and by at most this share of that along the other axis
STAR_INNER = 0.45  # a star's inner radius over its outer radius
DIAMOND_WIDTH = 0.7  # a diamond's width over its height
CROSS_ARM = 1 / 3  # a cross's arm width over its box side
RESOLUTIONS = (32, 64)  # what the judge is measured at; any size from 16 to 512 renders
PLACE_TRIES = 200
SCENE_TRIES = 50


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str  # size class, one of SIZES
    side: float  # the box side, fraction of the image side
    x: float  # box centre, fractions of the image (x to the right, y down)
    y: float

    def box(self) -> tuple[float, float, float, float]:
        h = self.side / 2
        return (self.x - h, self.y - h, self.x + h, self.y + h)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "side": self.side, "x": self.x, "y": self.y}


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise invalid("background", self.background, list(BACKGROUNDS))
        for o in self.objects:
            if o.shape not in SHAPES or o.colour not in COLOURS or o.size not in SIZES:
                raise invalid("scene object", o.to_dict(), f"shapes {SHAPES}, colours {list(COLOURS)}, sizes {SIZES}")

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(d["background"], tuple(SceneObject(**o) for o in d["objects"]))


# --- sampling ----------------------------------------------------------------------------------------


def _apart(a: SceneObject, b: SceneObject) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return bx0 - ax1 >= GAP or ax0 - bx1 >= GAP or by0 - ay1 >= GAP or ay0 - by1 >= GAP


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    """Whether a centre ``a`` is ``relation`` centre ``b``: the axis of the relation dominates and the
    centres differ along it by more than ``margin`` (fractions of the image side; y grows downwards)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if relation in ("left of", "right of"):
        d = dx if relation == "left of" else -dx
        return d > margin and abs(dx) > abs(dy)
    if relation in ("above", "below"):
        d = dy if relation == "above" else -dy
        return d > margin and abs(dy) > abs(dx)
    raise invalid("relation", relation, ["left of", "right of", "above", "below"])


def _clear(relation: str, a: SceneObject, b: SceneObject) -> bool:
    """The sampler's stricter form: the relation holds by far, so the judge's margin never decides."""
    main, cross = (b.x - a.x, b.y - a.y) if relation in ("left of", "right of") else (b.y - a.y, b.x - a.x)
    return relation_holds(relation, (a.x, a.y), (b.x, b.y), 0.0) and abs(main) >= REL_MAIN and abs(cross) <= REL_CROSS * abs(main)


def _attributes(spec: PromptSpec, rng: random.Random) -> list[tuple[int, str, str]]:
    """(entity index, colour, size) for every object the spec asks for; unspecified ones drawn."""
    out = []
    large = 0
    for i, e in enumerate(spec.entities):
        colour = e.colour or rng.choice(COMMON_COLOURS[e.shape])
        for _ in range(e.count):
            size = e.size or ("large" if large < 2 and rng.random() < 0.4 else "small")
            large += size == "large"
            out.append((i, colour, size))
    return out


def _place(objects: list[SceneObject], shape: str, colour: str, size: str, rng: random.Random) -> SceneObject | None:
    lo, hi = SIZE_RANGES[size]
    side = round(rng.uniform(lo, hi), 4)
    for _ in range(PLACE_TRIES):
        x = round(rng.uniform(MARGIN + side / 2, 1 - MARGIN - side / 2), 4)
        y = round(rng.uniform(MARGIN + side / 2, 1 - MARGIN - side / 2), 4)
        cand = SceneObject(shape, colour, size, side, x, y)
        if all(_apart(cand, o) for o in objects):
            return cand
    return None


def sample_scene(spec: PromptSpec, rng: random.Random) -> Scene:
    """A scene that makes every statement of ``spec`` true, with nothing else in it."""
    background = spec.background or rng.choice(list(BACKGROUNDS))
    attrs = _attributes(spec, rng)
    for _ in range(SCENE_TRIES):
        objects: list[SceneObject] = []
        for i, colour, size in attrs:
            obj = _place(objects, spec.entities[i].shape, colour, size, rng)
            if obj is None:
                break
            objects.append(obj)
        else:
            if spec.relation is None or _relation_ok(spec.relation, attrs, objects):
                rng.shuffle(objects)  # drawing order carries no meaning
                return Scene(background, tuple(objects))
    raise SelmaError(f"no room for the scene of {spec.to_dict()} after {SCENE_TRIES} tries; ask for fewer or smaller objects")


def _relation_ok(rel: Relation, attrs: list[tuple[int, str, str]], objects: list[SceneObject]) -> bool:
    by_entity = {i: obj for (i, _, _), obj in zip(attrs, objects, strict=True)}
    return _clear(rel.relation, by_entity[rel.subject], by_entity[rel.object])


# --- drawing -----------------------------------------------------------------------------------------


def shape_points(shape: str, cx: float, cy: float, s: float) -> list[tuple[float, float]]:
    """The polygon of a non-round shape filling a box of side ``s`` centred at (cx, cy), pixel units."""
    h = s / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # apex up, base and height s
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        w = h * DIAMOND_WIDTH
        return [(cx, cy - h), (cx + w, cy), (cx, cy + h), (cx - w, cy)]
    if shape == "cross":
        a = s * CROSS_ARM / 2
        return [(cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a), (cx + h, cy + a),
                (cx + a, cy + a), (cx + a, cy + h), (cx - a, cy + h), (cx - a, cy + a), (cx - h, cy + a),
                (cx - h, cy - a), (cx - a, cy - a)]
    if shape == "star":  # five points, one up; scaled so its box is s wide and centred
        r_out = s / (2 * math.sin(math.radians(72)))
        height = r_out * (1 + math.cos(math.radians(36)))
        oy = cy - height / 2 + r_out  # the star's centre, so that its box is centred at cy
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_out * STAR_INNER
            a = math.radians(-90 + 36 * k)
            pts.append((cx + r * math.cos(a), oy + r * math.sin(a)))
        return pts
    raise invalid("shape", shape, SHAPES)


def render_scene(scene: Scene, resolution: int = 64, supersample: int = 4) -> Any:
    """The scene as an RGB PIL image of ``resolution`` x ``resolution`` pixels (deterministic bytes)."""
    from PIL import Image, ImageDraw

    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 16 <= resolution <= 512:
        raise invalid("resolution", resolution, "an integer from 16 to 512 (the world is measured at 32 and 64)")
    if isinstance(supersample, bool) or not isinstance(supersample, int) or not 1 <= supersample <= 8:
        raise invalid("supersample", supersample, "an integer from 1 to 8")
    big = resolution * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        cx, cy, s = o.x * big, o.y * big, o.side * big
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], fill=fill)
        else:
            draw.polygon(shape_points(o.shape, cx, cy, s), fill=fill)
    return image.resize((resolution, resolution), Image.BOX) if supersample > 1 else image
