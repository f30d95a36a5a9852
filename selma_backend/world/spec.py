"""The world's vocabulary and what a prompt asserts about an image (its structured spec).

A :class:`PromptSpec` is the meaning of one world caption: the entities it names (shape, colour,
size and how many), at most one spatial relation between two single entities, and the background.
Captions are written from specs (:mod:`.captions`) and parsed back into them exactly, and the judge
(:mod:`.judge`) turns a spec into DSG-style yes/no questions.

Palettes are chosen so that every shape colour stays separable from every other one under
anti-aliasing on every background: a pixel mixed from a shape colour and the background lies on the
segment between them, and those segments are far apart beyond their midpoints (checked by a test).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..errors import invalid

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "diamond": "diamonds", "cross": "crosses"}
#: Shape colours (sRGB). Saturated, far apart, none on a line between a background and another colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (250, 225, 20),
    "green": (30, 160, 60),
    "cyan": (0, 200, 210),
    "blue": (30, 70, 230),
    "purple": (140, 40, 190),
    "pink": (255, 110, 190),
}
#: Background colours: neutral, never used for shapes.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "grey": (128, 128, 128),
    "black": (25, 25, 25),
}
SIZES = ("small", "large")
#: A size class is the side of the square box the shape fills, as a fraction of the image side.
SIZE_RANGES = {"small": (0.20, 0.24), "large": (0.32, 0.36)}
SIZE_THRESHOLD = 0.28  # the judge: a shape whose box is wider/taller than this fraction is large
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MAX_COUNT = 4
MAX_OBJECTS = 4  # objects in one image, all entities together
#: The "common" world: each shape is usually seen in these colours (base data, counting, spatial).
#: Every other (shape, colour) pair is rare: the Whoops analogue asks for exactly those.
COMMON_COLOURS: dict[str, tuple[str, ...]] = {
    "circle": ("red", "orange"),
    "square": ("blue", "green"),
    "triangle": ("green", "yellow"),
    "star": ("yellow", "orange"),
    "diamond": ("purple", "cyan"),
    "cross": ("pink", "red"),
}


def is_common(shape: str, colour: str) -> bool:
    return colour in COMMON_COLOURS[shape]


def rare_colours(shape: str) -> tuple[str, ...]:
    return tuple(c for c in COLOURS if c not in COMMON_COLOURS[shape])


@dataclass(frozen=True)
class Entity:
    """``count`` objects of ``shape``; ``colour``/``size`` None when the caption does not say.

    ``numbered``: the caption states the number with a number word ("one", "three"), so the judge
    asks for the exact count; "a red circle" is not numbered. Counts above one are always numbered.
    """

    shape: str
    colour: str | None = None
    size: str | None = None
    count: int = 1
    numbered: bool = False

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise invalid("shape", self.shape, SHAPES)
        if self.colour is not None and self.colour not in COLOURS:
            raise invalid("colour", self.colour, list(COLOURS))
        if self.size is not None and self.size not in SIZES:
            raise invalid("size", self.size, SIZES)
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 1 <= self.count <= MAX_COUNT:
            raise invalid("count", self.count, f"an integer from 1 to {MAX_COUNT}")
        if self.count > 1 and not self.numbered:
            object.__setattr__(self, "numbered", True)

    def matches(self, shape: str, colour: str, size: str) -> bool:
        """Whether an object with these attributes is one of this entity's objects."""
        return shape == self.shape and self.colour in (None, colour) and self.size in (None, size)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "count": self.count,
                "numbered": self.numbered}


@dataclass(frozen=True)
class Relation:
    """Entity ``subject`` is ``relation`` entity ``object`` (indices into the spec's entities)."""

    subject: int
    relation: str
    object: int

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise invalid("relation", self.relation, RELATIONS)
        if self.subject == self.object:
            raise invalid("relation object", self.object, "an entity other than the subject")


@dataclass(frozen=True)
class PromptSpec:
    """What one caption asserts. Entities must be told apart (another shape, or another colour)."""

    entities: tuple[Entity, ...]
    relation: Relation | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "entities", tuple(self.entities))
        if not 1 <= len(self.entities) <= 3:
            raise invalid("entities", len(self.entities), "1 to 3 entities")
        if sum(e.count for e in self.entities) > MAX_OBJECTS:
            raise invalid("entities", [e.to_dict() for e in self.entities], f"at most {MAX_OBJECTS} objects in all")
        for i, a in enumerate(self.entities):
            for b in self.entities[i + 1:]:
                if a.shape == b.shape and (a.colour is None or b.colour is None or a.colour == b.colour):
                    raise invalid("entities", [a.to_dict(), b.to_dict()], "entities of different shapes, or of "
                                  "one shape in two named colours")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise invalid("background", self.background, list(BACKGROUNDS))
        r = self.relation
        if r is not None:
            n = len(self.entities)
            if not (0 <= r.subject < n and 0 <= r.object < n):
                raise invalid("relation", r, f"entity indices below {n}")
            if self.entities[r.subject].count != 1 or self.entities[r.object].count != 1:
                raise invalid("relation", r, "a relation between two single objects")

    def to_dict(self) -> dict[str, Any]:
        r = self.relation
        return {"entities": [e.to_dict() for e in self.entities], "background": self.background,
                "relation": None if r is None else {"subject": r.subject, "relation": r.relation, "object": r.object}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptSpec:
        r = d.get("relation")
        return cls(entities=tuple(Entity(**e) for e in d["entities"]), background=d.get("background"),
                   relation=None if r is None else Relation(**r))

    def key(self) -> str:
        """The spec's meaning, independent of wording and order: "a left of b" equals "b right of a"."""
        ents = [json.dumps(e.to_dict(), sort_keys=True) for e in self.entities]
        rel = None
        if self.relation is not None:
            s, name, o = ents[self.relation.subject], self.relation.relation, ents[self.relation.object]
            rel = [s, name, o] if name in ("left of", "above") else [o, INVERSE[name], s]
        return json.dumps({"entities": sorted(ents), "relation": rel, "background": self.background}, sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.key().encode("utf-8")).hexdigest()
