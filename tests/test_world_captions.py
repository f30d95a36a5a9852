"""World captions: varied natural templates, and a parser that inverts every one of them exactly."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from selma_backend.errors import SelmaError
from selma_backend.world.captions import caption, parse_caption
from selma_backend.world.skills import WORLD_SKILLS
from selma_backend.world.spec import Entity, PromptSpec, Relation


def test_round_trip_is_exact_on_thousands_of_captions():
    rng = random.Random(0)
    names = WORLD_SKILLS.names()
    texts = Counter()
    for i in range(5000):
        spec = WORLD_SKILLS.get(names[i % len(names)]).sample(rng)
        text = caption(spec, rng)
        assert parse_caption(text) == spec, text
        texts[text.split()[0]] += 1
    assert len(texts) >= 8  # openings vary: "A", "Two", "There", "Grey", "An", ...


@pytest.mark.parametrize(("text", "spec"), [
    ("two red circles and a blue square on a grey background",
     PromptSpec((Entity("circle", "red", None, 2), Entity("square", "blue")), None, "grey")),
    ("A yellow star to the left of a green triangle.",
     PromptSpec((Entity("star", "yellow"), Entity("triangle", "green")), Relation(0, "left of", 1))),
    ("Gray background with one big orange circle, two crosses and a little cyan diamond",
     PromptSpec((Entity("circle", "orange", "large", 1, True), Entity("cross", None, None, 2),
                 Entity("diamond", "cyan", "small")), None, "grey")),
    ("There are four small stars", PromptSpec((Entity("star", None, "small", 4),))),
    ("an image of a pink cross beneath a purple cross against a black background",
     PromptSpec((Entity("cross", "pink"), Entity("cross", "purple")), Relation(0, "below", 1), "black")),
])
def test_known_captions_parse_to_their_meaning(text, spec):
    assert parse_caption(text) == spec


def test_articles_plurals_and_numbers_are_english():
    rng = random.Random(3)
    spec = PromptSpec((Entity("circle", "orange"), Entity("cross", "red", None, 2)))
    seen = {caption(spec, rng) for _ in range(200)}
    assert all("an orange circle" in s.lower() and "two red crosses" in s for s in seen)
    assert any(s.startswith("There is an orange") for s in seen)
    assert not any(s.lower().startswith("there are an") for s in seen)
    spec = PromptSpec((Entity("square", "blue", None, 3),), None, "white")
    assert any(s.startswith("There are three") for s in {caption(spec, rng) for _ in range(200)})


@pytest.mark.parametrize("text", [
    "a photo of a cat", "two red circle", "a circles", "a red circle and a red circle",
    "five stars", "a red circle to the left of two blue squares", "a red circle on a green background", "",
])
def test_text_outside_the_world_is_refused(text):
    with pytest.raises(SelmaError, match="world"):
        parse_caption(text)
