"""The ``offline`` chat backend: composes prompts from curated grammars, no model, deterministic.

It answers the same in-context request a real LLM gets, with a numbered list, so the generation loop,
parsing, deduplication and reporting are exercised exactly as with a model. The reply depends only
on (skill id, request seed), so the same run seed writes a byte-identical ``prompts.jsonl``.

Grammars and vocabularies are data (``offline_vocab.json``): a rule is a list of alternatives,
``<rule>`` expands one, ``<rule:s>``/``<rule:p>`` selects the singular/plural of ``"mug|mugs"``
entries. Within one prompt a rule does not repeat an alternative until all have been used, so lists
("chairs, lamps and a rug") do not stutter.

The miniature world's skills (``world_counting``, ``world_spatial``, ...: :mod:`..world.skills`) are
written by the world's own generator instead (its training split), so their prompts are captions the
world judge parses and the shipped world models were trained to draw.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

from ..errors import invalid
from ..llm.base import ChatMessage
from ..skills import Skill, count_words

VOCAB_FILE = Path(__file__).with_name("offline_vocab.json")
_REF = re.compile(r"<([a-z0-9_]+)(?::([sp]))?>")
_ARTICLE = re.compile(r"\b([Aa])n? (?=([A-Za-z]+))")
_AN_EXCEPTIONS = ("uni", "use", "usu", "uten", "euro", "one", "once", "ewe")
_AN_SILENT_H = ("hour", "honest", "heir")
_REQUEST_COUNT = re.compile(r"\bWrite (\d+) new\b")
_MAX_TRIES = 100
DEFAULT_BATCH = 20


@cache
def _rules() -> Mapping[str, tuple[str, ...]]:
    data = json.loads(VOCAB_FILE.read_text(encoding="utf-8"))
    return {k: tuple(v) for k, v in data["rules"].items()}


def offline_skills() -> list[str]:
    """Skill ids the offline generator writes prompts for: the built-in skills (grammars), then the world's."""
    return [k.removeprefix("start_") for k in _rules() if k.startswith("start_")] + _world_skill_ids()


def _world_skill_ids() -> list[str]:
    from ..world.skills import WORLD_SKILLS

    return WORLD_SKILLS.names()


def is_world_skill(skill_id: str) -> bool:
    """Whether the offline writer draws this skill's prompts from the world generator."""
    return skill_id in _world_skill_ids()


def world_offline_prompts(skill_id: str, n: int, seed: int, split: str = "train") -> list[str]:
    """``n`` captions of a world skill in ``split`` (``train``; ``heldout`` for evaluation) from the world
    generator, determined by (skill, seed, split)."""
    from ..world.skills import world_prompts

    return [r["prompt"] for r in world_prompts(skill_id, n, seed=seed, split=split)]


class _Expansion:
    """One prompt's expansion: the rng and which alternatives each rule has used so far."""

    def __init__(self, rules: Mapping[str, Sequence[str]], rng: random.Random) -> None:
        self.rules = rules
        self.rng = rng
        self.used: dict[str, set[int]] = {}

    def pick(self, name: str) -> str:
        alts = self.rules[name]
        used = self.used.setdefault(name, set())
        if len(used) >= len(alts):
            used.clear()
        free = [i for i in range(len(alts)) if i not in used]
        i = free[self.rng.randrange(len(free))]
        used.add(i)
        return alts[i]

    def expand(self, name: str, form: str = "s") -> str:
        alt = self.pick(name)
        if "<" not in alt:
            if "|" in alt:
                singular, plural = alt.split("|", 1)
                return plural if form == "p" else singular
            return alt
        return _REF.sub(lambda m: self.expand(m.group(1), m.group(2) or form), alt)


def _an(m: re.Match[str]) -> str:
    a, word = m.group(1), m.group(2).lower()
    vowel = word[0] in "aeiou" and not word.startswith(_AN_EXCEPTIONS)
    return (a + "n " if vowel or word.startswith(_AN_SILENT_H) else a + " ")


def tidy(text: str) -> str:
    """Fix a/an, spaces and punctuation; capitalise the first letter."""
    text = _ARTICLE.sub(_an, text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r" ([.,])", r"\1", text)
    return text[:1].upper() + text[1:]


def compose(skill_id: str, rng: random.Random) -> str:
    """One prompt for ``skill_id`` (a built-in skill) drawn with ``rng``."""
    if skill_id in _world_skill_ids():
        return world_offline_prompts(skill_id, 1, rng.randrange(2**63))[0]
    rules = _rules()
    start = f"start_{skill_id}"
    if start not in rules:
        raise invalid(
            "skill", skill_id, offline_skills(),
            "The offline generator only knows the built-in skills; for your own skill use --llm openai or transformers",
        )
    return tidy(_Expansion(rules, rng).expand(start))


def offline_prompts(skill: Skill, n: int, seed: int, split: str = "train") -> list[str]:
    """``n`` prompts under the skill's word limit, determined by (skill id, seed) alone. ``split`` chooses
    the world's train or held-out prompts for a world skill (the grammars of the others have no split)."""
    if skill.id in _world_skill_ids():
        return [t for t in world_offline_prompts(skill.id, n, seed, split) if count_words(t) < skill.word_limit]
    rng = random.Random(f"selma-offline:{skill.id}:{seed}")  # str seeds hash with SHA-512: stable
    out: list[str] = []
    for _ in range(n * _MAX_TRIES):
        if len(out) == n:
            break
        text = compose(skill.id, rng)
        if count_words(text) < skill.word_limit:
            out.append(text)
    return out


class OfflineBackend:
    """A :class:`~selma_backend.llm.base.ChatBackend` that writes a numbered list from the grammar."""

    source = "offline"

    def __init__(self, skill: Skill, split: str = "train") -> None:
        compose(skill.id, random.Random(0))  # fail now, with the teaching error, for unknown skills
        self.skill = skill
        self.split = split  # world skills: "train" (stage 1) or "heldout" (evaluation prompts)

    def chat(self, messages: list[ChatMessage], *, temperature: float = 1.0, max_tokens: int = 1024, seed: int | None = None) -> str:
        del temperature, max_tokens  # a grammar has no sampling temperature; replies are short
        match = _REQUEST_COUNT.search(messages[-1].content) if messages else None
        n = int(match.group(1)) if match else DEFAULT_BATCH
        prompts = offline_prompts(self.skill, n, 0 if seed is None else seed, self.split)
        return "\n".join(f"{i}. {p}" for i, p in enumerate(prompts, 1))

    def close(self) -> None:
        pass
