"""The shapes world's specs, scenes and drawing: valid, separable, non-overlapping, reproducible."""

from __future__ import annotations

import random

import numpy as np
import pytest

from selma_backend.errors import SelmaError
from selma_backend.world.scene import GAP, MARGIN, REL_CROSS, REL_MAIN, Scene, render_scene, sample_scene
from selma_backend.world.skills import WORLD_SKILLS
from selma_backend.world.spec import BACKGROUNDS, COLOURS, COMMON_COLOURS, Entity, PromptSpec, Relation


def _specs(n: int, seed: int = 0) -> list[PromptSpec]:
    rng = random.Random(seed)
    names = WORLD_SKILLS.names()
    return [WORLD_SKILLS.get(names[i % len(names)]).sample(rng) for i in range(n)]


def test_same_seed_same_bytes_other_seed_other_image():
    spec = PromptSpec((Entity("star", "yellow", count=3), Entity("circle", "red")), None, "grey")
    a = render_scene(sample_scene(spec, random.Random(7)), 64)
    b = render_scene(sample_scene(spec, random.Random(7)), 64)
    c = render_scene(sample_scene(spec, random.Random(8)), 64)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    scene = sample_scene(spec, random.Random(7))
    assert Scene.from_dict(scene.to_dict()) == scene  # the record in a PNG gives the scene back exactly


def test_scenes_hold_exactly_what_the_spec_says_without_overlap():
    for spec in _specs(600):
        scene = sample_scene(spec, random.Random(spec.digest()))
        for e in spec.entities:
            assert sum(e.matches(o.shape, o.colour, o.size) for o in scene.objects) == e.count
        assert len(scene.objects) == sum(e.count for e in spec.entities)
        if spec.background:
            assert scene.background == spec.background
        for i, a in enumerate(scene.objects):
            x0, y0, x1, y1 = a.box()
            assert min(x0, y0) >= MARGIN - 1e-9 and max(x1, y1) <= 1 - MARGIN + 1e-9
            for b in scene.objects[i + 1:]:
                bx0, by0, bx1, by1 = b.box()
                assert max(bx0 - x1, x0 - bx1, by0 - y1, y0 - by1) >= GAP - 1e-9
        r = spec.relation
        if r is not None:
            a, b = ([o for o in scene.objects if spec.entities[k].matches(o.shape, o.colour, o.size)][0]
                    for k in (r.subject, r.object))
            horizontal = r.relation in ("left of", "right of")
            main, cross = (b.x - a.x, b.y - a.y) if horizontal else (b.y - a.y, b.x - a.x)
            sign = 1 if r.relation in ("left of", "above") else -1
            assert sign * main >= REL_MAIN and abs(cross) <= REL_CROSS * abs(main)


def test_colours_stay_separable_under_antialiasing_on_every_background():
    """A pixel half covered by colour A lies on the segment background->A; it must stay far from
    every other colour's segment, or an edge of A could be counted as a thin shape of B."""
    worst = np.inf
    for bg in BACKGROUNDS.values():
        bg = np.array(bg, float)
        for a_name, a in COLOURS.items():
            va = np.array(a, float) - bg
            for b_name, b in COLOURS.items():
                if a_name == b_name:
                    continue
                vb = np.array(b, float) - bg
                for t in np.linspace(0.5, 1.0, 26):
                    p = t * va
                    s = np.clip(p @ vb / (vb @ vb), 0, 1)
                    worst = min(worst, np.linalg.norm(p - s * vb))
    assert worst >= 30.0
    assert not set(COLOURS) & set(BACKGROUNDS)
    assert {c for cs in COMMON_COLOURS.values() for c in cs} == set(COLOURS)  # every colour is common somewhere


def test_pixels_are_background_or_a_mix_of_one_colour_and_it():
    scene = Scene("grey", ())
    assert set(map(tuple, np.asarray(render_scene(scene, 32)).reshape(-1, 3))) == {BACKGROUNDS["grey"]}
    spec = PromptSpec((Entity("cross", "blue"),), None, "black")
    arr = np.asarray(render_scene(sample_scene(spec, random.Random(1)), 32), dtype=float)
    bg, blue = np.array(BACKGROUNDS["black"], float), np.array(COLOURS["blue"], float)
    t = (arr - bg) @ (blue - bg) / ((blue - bg) @ (blue - bg))
    off_line = np.linalg.norm(arr - bg - t[..., None] * (blue - bg), axis=-1)
    assert off_line.max() < 2.0  # uint8 rounding only
    assert (t > 0.99).sum() > 20 and ((t > 0.05) & (t < 0.95)).sum() > 5  # solid inside, anti-aliased edges


@pytest.mark.parametrize("bad", [
    lambda: Entity("hexagon"),
    lambda: Entity("circle", "brown"),
    lambda: Entity("circle", count=5),
    lambda: PromptSpec((Entity("circle", "red"), Entity("circle"))),  # "a red circle and a circle": which?
    lambda: PromptSpec((Entity("circle", count=3), Entity("square", count=2))),  # five objects
    lambda: PromptSpec((Entity("circle", count=2), Entity("square")), Relation(0, "above", 1)),
    lambda: PromptSpec((Entity("circle"), Entity("square")), Relation(0, "behind", 1)),
    lambda: PromptSpec((Entity("circle"),), None, "green"),
])
def test_invalid_specs_are_refused_with_a_teaching_error(bad):
    with pytest.raises(SelmaError, match="allowed"):
        bad()


def test_spec_key_is_the_meaning_not_the_wording():
    a, b = Entity("star", "yellow"), Entity("triangle", "green")
    left = PromptSpec((a, b), Relation(0, "left of", 1))
    right = PromptSpec((b, a), Relation(0, "right of", 1))
    assert left.key() == right.key() and left != right
    assert left.key() != PromptSpec((a, b), Relation(0, "right of", 1)).key()
    assert PromptSpec.from_dict(left.to_dict()) == left
    assert Entity("circle", count=2).numbered  # counts above one are always stated with a number
