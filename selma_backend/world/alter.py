"""Minimal pairs: a spec with one fact changed, checked false on a scene, captioned in the same words.

A CLIP model that can count, place and bind must prefer the true caption of an image to the same
caption with one fact changed. :func:`alterations` lists every valid spec that differs from a spec by
one fact of a kind (:data:`ALTERATIONS`: a count, the relation, two entities' colours swapped, a shape,
one colour, a size, the background); :func:`false_on` keeps those the scene's ground truth refutes
(an alteration can be true by accident: "a red circle and a blue circle" with the colours swapped
means the same); :func:`minimal_pair` captions the spec and its alterations with one seed, so the
wording (opening, synonyms, background frame) is the same and only the changed fact differs.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from ..errors import SelmaError, invalid
from .captions import caption
from .judge import Detections, answer, questions_for
from .scene import Scene
from .spec import BACKGROUNDS, COLOURS, MAX_COUNT, RELATIONS, SHAPES, SIZES, Entity, PromptSpec

#: The kinds evaluation reports on; training also uses EXTRA_ALTERATIONS as hard negatives.
EVAL_ALTERATIONS = ("count", "relation", "colour_swap", "shape")
EXTRA_ALTERATIONS = ("colour", "size", "background")
ALTERATIONS = EVAL_ALTERATIONS + EXTRA_ALTERATIONS
RELATION_MARGIN = 0.05  # the judge's default margin, for checking alterations on ground truth


def _spec(entities: tuple[Entity, ...], spec: PromptSpec) -> list[PromptSpec]:
    """``[spec with these entities]``, or ``[]`` where that is not a valid spec (too many objects, ...)."""
    try:
        return [PromptSpec(entities, spec.relation, spec.background)]
    except SelmaError:
        return []


def _entity(spec: PromptSpec, i: int, **changes: object) -> list[PromptSpec]:
    """``[spec with entity i changed]``, or ``[]`` where that is not valid."""
    try:
        e = dataclasses.replace(spec.entities[i], **changes)
    except SelmaError:
        return []
    return _spec(spec.entities[:i] + (e,) + spec.entities[i + 1:], spec)


def _counts(spec: PromptSpec) -> list[PromptSpec]:
    return [s for i, e in enumerate(spec.entities) for c in range(1, MAX_COUNT + 1) if c != e.count
            for s in _entity(spec, i, count=c, numbered=True)]


def _relations(spec: PromptSpec) -> list[PromptSpec]:
    r = spec.relation
    if r is None:
        return []
    return [dataclasses.replace(spec, relation=dataclasses.replace(r, relation=name)) for name in RELATIONS
            if name != r.relation]


def _colour_swaps(spec: PromptSpec) -> list[PromptSpec]:
    out: list[PromptSpec] = []
    ents = spec.entities
    for i in range(len(ents)):
        for j in range(i + 1, len(ents)):
            a, b = ents[i], ents[j]
            if a.colour and b.colour and a.colour != b.colour:
                swapped = list(ents)
                swapped[i], swapped[j] = dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour)
                out += _spec(tuple(swapped), spec)
    return out


def _shapes(spec: PromptSpec) -> list[PromptSpec]:
    return [s for i, e in enumerate(spec.entities) for shape in SHAPES if shape != e.shape
            for s in _entity(spec, i, shape=shape)]


def _colours(spec: PromptSpec) -> list[PromptSpec]:
    return [s for i, e in enumerate(spec.entities) if e.colour for c in COLOURS if c != e.colour
            for s in _entity(spec, i, colour=c)]


def _sizes(spec: PromptSpec) -> list[PromptSpec]:
    return [s for i, e in enumerate(spec.entities) if e.size for z in SIZES if z != e.size
            for s in _entity(spec, i, size=z)]


def _backgrounds(spec: PromptSpec) -> list[PromptSpec]:
    if spec.background is None:
        return []
    return [dataclasses.replace(spec, background=b) for b in BACKGROUNDS if b != spec.background]


_MAKERS: dict[str, Callable[[PromptSpec], list[PromptSpec]]] = {
    "count": _counts, "relation": _relations, "colour_swap": _colour_swaps, "shape": _shapes,
    "colour": _colours, "size": _sizes, "background": _backgrounds,
}


def alterations(spec: PromptSpec, kind: str) -> list[PromptSpec]:
    """Every valid spec that differs from ``spec`` by one fact of ``kind`` (deterministic order)."""
    if kind not in _MAKERS:
        raise invalid("alteration kind", kind, ALTERATIONS)
    return _MAKERS[kind](spec)


def holds(spec: PromptSpec, truth: Detections) -> bool:
    """Whether every statement of ``spec`` is true of ``truth`` (detections or a scene's ground truth)."""
    return all(answer(q, spec, truth, RELATION_MARGIN) for q in questions_for(spec))


def false_on(specs: list[PromptSpec], scene: Scene) -> list[PromptSpec]:
    """The specs the scene's ground truth refutes."""
    from .measure import ground_truth

    truth = ground_truth(scene)
    return [s for s in specs if not holds(s, truth)]


def minimal_pair(spec: PromptSpec, altered: list[PromptSpec], seed: int) -> tuple[str, list[str]]:
    """Captions of ``spec`` and of each altered spec, all drawn from the same seed (the same wording)."""
    return caption(spec, random.Random(seed)), [caption(a, random.Random(seed)) for a in altered]
