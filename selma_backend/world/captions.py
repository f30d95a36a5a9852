"""Captions of the world: natural English from varied templates, and the exact inverse parser.

A caption is a frame around a body. The body lists the entities ("two red circles and a blue
square", "a small yellow star, one green triangle and three crosses") or states one relation ("a
yellow star to the left of a green triangle"); the frame adds an opening ("A picture of ...",
"There are ...") and the background ("... on a grey background", "Black background with ...").
Every template is chosen with the caller's ``random.Random``, so captions are reproducible.

:func:`parse_caption` inverts every template exactly (``parse_caption(caption(spec, rng)) == spec``,
tested on thousands of captions), so the judge can score any world prompt by its text alone. Text
outside the world's language is refused with an error that says what the world's captions look like.
"""

from __future__ import annotations

import random
import re

from ..errors import SelmaError
from .spec import BACKGROUNDS, COLOURS, PLURALS, SHAPES, Entity, PromptSpec, Relation

NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
NUMBER_WORDS = {v: k for k, v in NUMBERS.items()}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
BACKGROUND_WORDS = {"grey": ("grey", "gray")}
OPENINGS = ("", "a picture of ", "an image of ", "a drawing of ", "there {be} ")
#: Background frames: {body} and {bg}; the opening goes before {body} where the frame starts with it.
BG_FRAMES = ("{open}{body} on a {bg} background", "{open}{body} against a {bg} background", "{bg} background with {body}")
EXAMPLE = "two red circles and a blue square on a grey background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def entity_phrase(e: Entity, rng: random.Random) -> str:
    """"two red circles", "a big orange star", "one cross"."""
    size = rng.choice(SIZE_WORDS[e.size]) if e.size else None
    words = [w for w in (size, e.colour, PLURALS[e.shape] if e.count > 1 else e.shape) if w]
    det = NUMBER_WORDS[e.count] if e.numbered else _article(words[0])
    return " ".join([det, *words])


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(spec: PromptSpec, rng: random.Random) -> str:
    """One caption of ``spec``, templates and synonyms drawn with ``rng``."""
    phrases = [entity_phrase(e, rng) for e in spec.entities]
    r = spec.relation
    if r is not None:
        if len(spec.entities) != 2 or (r.subject, r.object) != (0, 1):
            raise SelmaError("captions state a relation between the first and the second of exactly two entities")
        body = f"{phrases[0]} {rng.choice(RELATION_WORDS[r.relation])} {phrases[1]}"
    else:
        body = _join(phrases)
    opening = rng.choice(OPENINGS).replace("{be}", "are" if phrases[0].split()[0] in ("two", "three", "four") else "is")
    if spec.background is None:
        text = opening + body
    else:
        bg = rng.choice(BACKGROUND_WORDS.get(spec.background, (spec.background,)))
        frame = rng.choice(BG_FRAMES)
        text = frame.format(open=opening if "{open}" in frame else "", body=body, bg=bg)
    return text[0].upper() + text[1:]


# --- parsing --------------------------------------------------------------------------------------------

_alt = "|".join
_SIZE_OF = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
_SHAPE_OF = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
_BG_OF = {w: b for b in BACKGROUNDS for w in BACKGROUND_WORDS.get(b, (b,))}
_ENTITY = re.compile(rf"^(a|an|{_alt(NUMBERS)}) (?:({_alt(_SIZE_OF)}) )?(?:({_alt(COLOURS)}) )?({_alt(_SHAPE_OF)})$")
_REL_OF = {w: r for r, ws in RELATION_WORDS.items() for w in ws}
_RELATION = re.compile(rf" ({_alt(sorted(_REL_OF, key=len, reverse=True))}) ")
_BG = _alt(_BG_OF)
_BG_PREFIX = re.compile(rf"^({_BG}) background with (.+)$")
_BG_SUFFIX = re.compile(rf"^(.+) (?:on|against) a ({_BG}) background$")
_OPENING = re.compile(r"^(?:a picture of|an image of|a drawing of|there is|there are) (.+)$")


def _parse_entity(text: str) -> Entity | None:
    m = _ENTITY.match(text)
    if not m:
        return None
    det, size, colour, noun = m.groups()
    count = NUMBERS.get(det, 1)
    if (noun in SHAPES) != (count == 1):
        return None  # "two circle", "a circles"
    return Entity(_SHAPE_OF[noun], colour, _SIZE_OF.get(size) if size else None, count, det in NUMBERS)


def _parse_body(body: str) -> tuple[tuple[Entity, ...], Relation | None] | None:
    parts = _RELATION.split(body)
    if len(parts) == 3:
        a, b = _parse_entity(parts[0]), _parse_entity(parts[2])
        return ((a, b), Relation(0, _REL_OF[parts[1]], 1)) if a and b else None
    if len(parts) != 1:
        return None
    head, _, last = body.rpartition(" and ")
    pieces = [*head.split(", "), last] if head else [body]
    ents = [_parse_entity(p) for p in pieces]
    return (tuple(ents), None) if all(ents) else None  # type: ignore[return-value]


def parse_caption(text: str) -> PromptSpec:
    """The spec of a world caption (any template of :func:`caption`); a SelmaError for other text."""
    t = " ".join(text.strip().rstrip(".").lower().split())
    background = None
    if m := _BG_PREFIX.match(t):
        background, t = _BG_OF[m.group(1)], m.group(2)
    elif m := _BG_SUFFIX.match(t):
        t, background = m.group(1), _BG_OF[m.group(2)]
    if m := _OPENING.match(t):
        t = m.group(1)
    parsed = _parse_body(t)
    if parsed is None:
        raise SelmaError(f"not a caption of the shapes world: {text!r}; world captions name 1-4 shapes with "
                         f"optional size and colour, e.g. {EXAMPLE!r}")
    entities, relation = parsed
    try:
        return PromptSpec(entities, relation, background)
    except SelmaError as e:
        raise SelmaError(f"caption {text!r} does not describe a world scene: {e}") from e
