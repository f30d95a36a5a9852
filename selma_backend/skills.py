"""Skills: what stage 1 asks the LLM to write prompts for.

A skill is an id, a display name, an instruction (the rules the LLM must follow), at least three seed
examples, a word limit and a flip policy (used by training: spatial captions must not be mirrored
blindly). The built-in skills live in :mod:`.builtin_skills`; users add their own as JSON or TOML
files, one skill per file, with the same keys::

    id = "signage"                      # lowercase letters, digits, _ and -
    name = "Shop signage"
    instruction = "Write descriptions of shop fronts ..."
    examples = ["...", "...", "..."]    # at least 3
    word_limit = 30                      # every prompt has fewer words than this
    flip = "never"                       # allow | never | swap_left_right

A user skills folder holds such files (``*.json``, ``*.toml``); it is the ``user_dir`` argument, or
the ``SELMA_SKILLS_DIR`` environment variable when no folder is given.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .builtin_skills import BUILTIN_SKILL_FIELDS
from .errors import SelmaError, invalid

#: Horizontal-flip policies for training: ``allow`` (mirror freely), ``never`` (text, logos,
#: handedness matter), ``swap_left_right`` (mirror and swap "left"/"right" in the caption).
FLIP_POLICIES = ("allow", "never", "swap_left_right")
SKILL_FILE_SUFFIXES = (".json", ".toml")
SKILL_KEYS = ("id", "name", "instruction", "examples", "word_limit", "flip")
MIN_EXAMPLES = 3
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
ENV_SKILLS_DIR = "SELMA_SKILLS_DIR"


@dataclass(frozen=True)
class Skill:
    id: str
    name: str
    instruction: str
    examples: tuple[str, ...]
    word_limit: int
    flip: str = "allow"
    #: ``"builtin"``, ``"fields"`` (typed into a node) or the file it was read from. Not compared.
    origin: str = field(default="builtin", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID_RE.match(self.id):
            raise invalid("id", self.id, "1-64 characters: lowercase letters, digits, '_' and '-', starting with a letter or digit")
        for key in ("name", "instruction"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise invalid(key, value, "a non-empty string")
        if isinstance(self.examples, str) or not isinstance(self.examples, Iterable):
            raise invalid("examples", self.examples, f"a list of at least {MIN_EXAMPLES} strings")
        examples = tuple(self.examples)
        if not all(isinstance(e, str) for e in examples):
            raise invalid("examples", examples, f"a list of at least {MIN_EXAMPLES} strings")
        examples = tuple(e.strip() for e in examples if e.strip())
        if len(examples) < MIN_EXAMPLES:
            raise invalid("examples", list(examples), f"at least {MIN_EXAMPLES} non-empty example prompts", "Add more seed examples")
        object.__setattr__(self, "examples", examples)
        if isinstance(self.word_limit, bool) or not isinstance(self.word_limit, int) or not 3 <= self.word_limit <= 300:
            raise invalid("word_limit", self.word_limit, "an integer from 3 to 300 (prompts have fewer words than this)")
        too_long = [e for e in examples if count_words(e) >= self.word_limit]
        if too_long:
            raise invalid("examples", too_long[0], f"examples with fewer than word_limit={self.word_limit} words", "Shorten it or raise word_limit")
        if self.flip not in FLIP_POLICIES:
            raise invalid("flip", self.flip, FLIP_POLICIES)

    def to_dict(self) -> dict[str, Any]:
        """The skill as it is recorded in artefacts (and as a user skill file would hold it)."""
        d = asdict(self)
        d["examples"] = list(self.examples)
        return d


def count_words(text: str) -> int:
    """Words as the word limit counts them: whitespace-separated pieces."""
    return len(text.split())


def builtin_skills() -> dict[str, Skill]:
    """The built-in skills by id, in a stable order (SELMA's five first)."""
    return {f["id"]: Skill(**f) for f in BUILTIN_SKILL_FIELDS}  # type: ignore[arg-type]


def skill_from_fields(
    id: str,
    name: str,
    instruction: str,
    examples: str | Iterable[str],
    word_limit: int,
    flip: str = "allow",
    *,
    origin: str = "fields",
) -> Skill:
    """Build a skill from text fields (a node's widgets): ``examples`` may be one example per line."""
    if isinstance(examples, str):
        examples = [line for line in examples.splitlines() if line.strip()]
    return Skill(id=id, name=name or id, instruction=instruction, examples=tuple(examples), word_limit=word_limit, flip=flip, origin=origin)


def _read_mapping(path: Path) -> Mapping[str, Any]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SelmaError(f"skill file {path}: cannot be read ({e.strerror})") from e
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SelmaError(f"skill file {path}: not valid JSON (line {e.lineno}: {e.msg}); fix the syntax") from e
    elif suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError as e:
                raise SelmaError(f"skill file {path}: reading TOML on Python 3.10 needs the 'tomli' package; install it or use JSON") from e
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SelmaError(f"skill file {path}: not valid TOML ({e}); fix the syntax") from e
    else:
        raise invalid(f"skill file {path}", path.suffix, SKILL_FILE_SUFFIXES)
    if not isinstance(data, Mapping):
        raise SelmaError(f"skill file {path}: the top level must be an object/table with keys {', '.join(SKILL_KEYS)}")
    return data


def load_skill_file(path: str | os.PathLike[str]) -> Skill:
    """Read one skill from a ``.json`` or ``.toml`` file; errors name the file, the field and the fix."""
    path = Path(path)
    data = _read_mapping(path)
    unknown = sorted(set(data) - set(SKILL_KEYS))
    if unknown:
        raise SelmaError(f"skill file {path}: unknown field {unknown[0]!r}; allowed fields: {', '.join(SKILL_KEYS)}")
    missing = [k for k in SKILL_KEYS if k not in data and k != "flip"]
    if missing:
        raise SelmaError(f"skill file {path}: missing field {missing[0]!r}; a skill needs {', '.join(SKILL_KEYS)} (flip defaults to 'allow')")
    examples = data["examples"]
    if isinstance(examples, str) or not isinstance(examples, list):
        raise SelmaError(f"skill file {path}: examples: got {examples!r}; allowed: a list of at least {MIN_EXAMPLES} strings")
    try:
        return Skill(
            id=data["id"],
            name=data["name"],
            instruction=data["instruction"],
            examples=tuple(examples),
            word_limit=data["word_limit"],
            flip=data.get("flip", "allow"),
            origin=str(path),
        )
    except SelmaError as e:
        raise SelmaError(f"skill file {path}: {e}") from e


def load_skills_dir(path: str | os.PathLike[str]) -> dict[str, Skill]:
    """Every ``*.json``/``*.toml`` skill in a folder (not recursive), by id, in file-name order."""
    path = Path(path)
    if not path.is_dir():
        raise invalid("skills folder", str(path), "an existing folder of .json/.toml skill files")
    skills: dict[str, Skill] = {}
    for file in sorted(p for p in path.iterdir() if p.suffix.lower() in SKILL_FILE_SUFFIXES and p.is_file()):
        skill = load_skill_file(file)
        if skill.id in skills:
            raise SelmaError(f"skill file {file}: id {skill.id!r} is also used by {skills[skill.id].origin}; give one of them another id")
        skills[skill.id] = skill
    return skills


def _user_dir(user_dir: str | os.PathLike[str] | None) -> Path | None:
    if user_dir is None:
        env = os.environ.get(ENV_SKILLS_DIR, "").strip()
        return Path(env) if env else None
    return Path(user_dir)


def world_skills() -> dict[str, Skill]:
    """The miniature world's skills (:mod:`.world.skills`, origin ``"world"``) by id: the shipped world
    models' skills, whose offline prompts are the world generator's captions."""
    return dict(_world_skills())


@cache
def _world_skills() -> tuple[tuple[str, Skill], ...]:
    from .world.skills import WORLD_SKILLS, as_selma_skill

    return tuple((sid, as_selma_skill(sid)) for sid in WORLD_SKILLS.names())


def all_skills(user_dir: str | os.PathLike[str] | None = None) -> dict[str, Skill]:
    """Built-in skills, the world's, then the user folder's. A user skill may not reuse a built-in id;
    a user file with a world skill's id replaces the world skill (the user's definition wins)."""
    skills = builtin_skills() | world_skills()
    folder = _user_dir(user_dir)
    if folder is not None and folder.exists():
        for sid, skill in load_skills_dir(folder).items():
            if sid in skills and skills[sid].origin == "builtin":
                raise SelmaError(f"skill file {skill.origin}: id {sid!r} is a built-in skill; choose another id (e.g. {sid}_custom)")
            skills[sid] = skill
    return skills


def list_skills(user_dir: str | os.PathLike[str] | None = None) -> list[Skill]:
    """All skills (built-in first, then the world's, then the user's), for a listing or a dropdown."""
    return list(all_skills(user_dir).values())


def resolve_skill(id_or_path: str | os.PathLike[str] | Skill, user_dir: str | os.PathLike[str] | None = None) -> Skill:
    """A skill by id (built-in or user folder) or by the path of a skill file."""
    if isinstance(id_or_path, Skill):
        return id_or_path
    text = str(id_or_path)
    if Path(text).suffix.lower() in SKILL_FILE_SUFFIXES or os.sep in text or "/" in text:
        if not Path(text).is_file():
            raise invalid("skill", text, "a built-in or user skill id, or an existing .json/.toml skill file")
        return load_skill_file(text)
    skills = all_skills(user_dir)
    if text not in skills:
        raise invalid("skill", text, list(skills), "Or give the path of a .json/.toml skill file")
    return skills[text]
