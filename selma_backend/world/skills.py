"""Skills of the world and their offline prompt generators, with a train / held-out split.

Each world skill draws :class:`~.spec.PromptSpec` s with a ``random.Random`` and writes them as
captions (:mod:`.captions`). The skills mirror SELMA's (Li et al., NeurIPS 2024) on a miniature scale:

- ``world_common``: the base distribution -- every shape in one of its common colours
  (:data:`~.spec.COMMON_COLOURS`); the data a base model is trained on.
- ``world_counting``: 1-4 objects of a kind, sometimes with one other object (CountBench).
- ``world_spatial``: two objects and one of left of / right of / above / below.
- ``world_binding``: two objects whose common colours are swapped ("a blue circle and a red square"
  where circles are red and squares blue): attribute binding.
- ``world_whoops``: a shape in a colour it never has in the common world (WHOOPS!'s unusual
  combinations), sometimes beside a common one.

Rows have the ``prompts.jsonl`` shape stage 2 reads (``id``, ``skill``, ``prompt``, ``source``,
``seed``) plus ``split`` and ``spec``. The split is a stable hash of the spec's meaning
(:meth:`PromptSpec.key`), the same for every skill and every wording, so no held-out scene content is
ever a training prompt, in any skill, under any phrasing.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SelmaError, invalid
from ..fsio import atomic_write_json, atomic_write_text
from ..registry import Registry
from .captions import caption
from .spec import BACKGROUNDS, COMMON_COLOURS, RELATIONS, SHAPES, SIZES, Entity, PromptSpec, Relation, rare_colours

SPLITS = ("train", "heldout", "all")
HELDOUT_FRACTION = 0.2
SOURCE = "world"
STALE_DRAWS = 2000  # give up after this many draws in a row without a new prompt


@dataclass(frozen=True)
class WorldSkill:
    id: str
    name: str
    instruction: str  # what the skill teaches, as a SELMA skill's instruction
    flip: str  # SELMA flip policy for training (spatial captions swap left/right)
    sample: Callable[[random.Random], PromptSpec]


WORLD_SKILLS: Registry[WorldSkill] = Registry("world skill")


def _bg(rng: random.Random) -> str | None:
    return rng.choice(list(BACKGROUNDS)) if rng.random() < 0.5 else None


def _size(rng: random.Random, p: float = 0.3) -> str | None:
    return rng.choice(SIZES) if rng.random() < p else None


def _common(shape: str, rng: random.Random) -> str:
    return rng.choice(COMMON_COLOURS[shape])


def sample_common(rng: random.Random) -> PromptSpec:
    if rng.random() < 0.3:
        return sample_spatial(rng)
    shapes = rng.sample(SHAPES, rng.randint(1, 3))
    counts = [1] * len(shapes)
    if len(shapes) < 3 and rng.random() < 0.4:
        counts[0] = 2
    return PromptSpec(tuple(Entity(s, _common(s, rng), _size(rng, 0.2), c) for s, c in zip(shapes, counts, strict=True)),
                      None, _bg(rng))


def sample_counting(rng: random.Random) -> PromptSpec:
    shape = rng.choice(SHAPES)
    count = rng.randint(1, 4)
    colour = _common(shape, rng) if rng.random() < 0.7 else None
    size = _size(rng) if count <= 2 else ("small" if rng.random() < 0.2 else None)
    ents = [Entity(shape, colour, size, count, numbered=True)]
    if count < 4 and rng.random() < 0.35:
        other = rng.choice([s for s in SHAPES if s != shape])
        ents.append(Entity(other, _common(other, rng), None, 1, numbered=rng.random() < 0.5))
    return PromptSpec(tuple(ents), None, _bg(rng))


def sample_spatial(rng: random.Random) -> PromptSpec:
    a, b = rng.choice(SHAPES), rng.choice(SHAPES)
    ca, cb = _common(a, rng), _common(b, rng)
    if a == b and ca == cb:
        cb = next(c for c in COMMON_COLOURS[b] if c != ca)
    ents = (Entity(a, ca, _size(rng, 0.15)), Entity(b, cb, _size(rng, 0.15)))
    return PromptSpec(ents, Relation(0, rng.choice(RELATIONS), 1), _bg(rng))


def sample_binding(rng: random.Random) -> PromptSpec:
    while True:
        a, b = rng.sample(SHAPES, 2)
        ca, cb = _common(a, rng), _common(b, rng)
        if ca not in COMMON_COLOURS[b] and cb not in COMMON_COLOURS[a]:
            break
    ents = [Entity(a, cb, _size(rng, 0.2)), Entity(b, ca, _size(rng, 0.2))]  # colours swapped
    rng.shuffle(ents)
    return PromptSpec(tuple(ents), None, _bg(rng))


def sample_whoops(rng: random.Random) -> PromptSpec:
    shape = rng.choice(SHAPES)
    ents = [Entity(shape, rng.choice(rare_colours(shape)), _size(rng), rng.choice((1, 1, 1, 2)))]
    if rng.random() < 0.4:
        other = rng.choice([s for s in SHAPES if s != shape])
        ents.append(Entity(other, _common(other, rng)))
        rng.shuffle(ents)
    return PromptSpec(tuple(ents), None, _bg(rng))


for _skill in (
    WorldSkill("world_common", "World: common scenes", "Shapes in their usual colours, alone or in small groups.",
               "swap_left_right", sample_common),
    WorldSkill("world_counting", "World: counting", "One to four shapes of a kind, stated with a number word.",
               "allow", sample_counting),
    WorldSkill("world_spatial", "World: spatial relations", "Two shapes, one left of, right of, above or below the other.",
               "swap_left_right", sample_spatial),
    WorldSkill("world_binding", "World: colour binding", "Two shapes, each in the colour the other one usually has.",
               "allow", sample_binding),
    WorldSkill("world_whoops", "World: unusual combinations", "A shape in a colour it never has in the common world.",
               "allow", sample_whoops),
):
    WORLD_SKILLS.add(_skill.id, _skill)


def split_of(spec: PromptSpec, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """``heldout`` or ``train``: a stable hash of the spec's meaning (not its wording, not its skill)."""
    bucket = int(spec.digest()[:8], 16) / 0x1_0000_0000
    return "heldout" if bucket < heldout_fraction else "train"


def world_prompts(skill: str, n: int, seed: int = 0, split: str = "train",
                  heldout_fraction: float = HELDOUT_FRACTION) -> list[dict[str, Any]]:
    """``n`` prompt rows of a world skill in ``split``, distinct in meaning, determined by the arguments."""
    ws = WORLD_SKILLS.get(skill)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise invalid("n", n, "an integer >= 1")
    if split not in SPLITS:
        raise invalid("split", split, SPLITS)
    if not 0 < heldout_fraction < 1:
        raise invalid("heldout_fraction", heldout_fraction, "a fraction in (0, 1)")
    rng = random.Random(f"selma-world:{skill}:{seed}")
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    stale = 0  # draws since the last new prompt: the skill's space is exhausted when this grows large
    while len(rows) < n and stale < STALE_DRAWS:
        spec = ws.sample(rng)
        key = spec.key()
        where = split_of(spec, heldout_fraction)
        if key in seen or (split != "all" and where != split):
            stale += 1
            continue
        stale = 0
        seen.add(key)
        tag = "h" if where == "heldout" else "t"
        rows.append({"id": f"{skill}-{tag}{len(rows):06d}", "skill": skill, "prompt": caption(spec, rng),
                     "source": SOURCE, "seed": seed, "split": where, "spec": spec.to_dict()})
    if len(rows) < n:
        raise SelmaError(f"world skill {skill!r} has fewer than {n} distinct {split} prompts that this generator finds "
                         f"(found {len(rows)}, then {STALE_DRAWS} draws without a new one); ask for fewer")
    return rows


def write_prompts(rows: list[dict[str, Any]], out_path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write rows as a ``prompts.jsonl`` (atomically; an existing file is kept unless ``overwrite``)."""
    import json

    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    return atomic_write_text(out_path, text, overwrite=overwrite)


def as_selma_skill(skill: str) -> Any:
    """The world skill as a :class:`selma_backend.skills.Skill` (examples: three of its prompts)."""
    from ..skills import Skill

    ws = WORLD_SKILLS.get(skill)
    examples = tuple(r["prompt"] for r in world_prompts(skill, 3, seed=0, split="train"))
    return Skill(id=ws.id, name=ws.name, instruction=ws.instruction, examples=examples, word_limit=30,
                 flip=ws.flip, origin="world")


def write_skill_files(folder: str | os.PathLike[str]) -> list[Path]:
    """One JSON skill file per world skill in ``folder`` (a SELMA user skills folder, ``SELMA_SKILLS_DIR``),
    so prompts, training (flip policies) and evaluation resolve the world's skill ids."""
    out = []
    for sid in WORLD_SKILLS:
        d = as_selma_skill(sid).to_dict()
        d.pop("origin", None)
        out.append(atomic_write_json(Path(folder) / f"{sid}.json", d))
    return out
