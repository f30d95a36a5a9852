"""Evaluation prompts: held-out prompts per skill, or the user's own prompt files, kept apart from training.

Two sources, combined by :func:`collect_prompts` from a :class:`PromptSpec`:

* held-out prompts: stage 1's generator (:func:`selma_backend.prompts.generate_prompts`) run with
  another seed, with the training prompts as its contamination guard (a candidate whose ROUGE-L F
  with any training prompt is above ``threshold`` is rejected), then checked once more;
* prompt files: ``.jsonl`` / ``.json`` (objects or strings; a JSON object may also map ids to
  prompts), ``.csv`` / ``.tsv`` (a header row), ``.txt`` (one prompt a line) -- e.g. DSG-1k or
  TIFA prompt lists, PartiPrompts. The prompt column is ``prompt``, ``text`` or ``caption`` (any case)
  unless named; ids come from ``id``, ``prompt_id`` or ``item_id`` (else ``<file stem>-<row>``);
  the skill from ``skill`` or ``category`` (else ``PromptSpec.skill``, else the file stem). Files that
  repeat a prompt on several rows (DSG-1k has one row per question) give it once.

User files are checked against the training prompts too; a prompt that nearly copies one is dropped
and listed in the report (a held-out score on a training prompt measures memory, not skill).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SelmaError, check_int, invalid
from ..fsio import atomic_write_json, read_jsonl
from ..paths import slug
from ..prompts.dedup import RougePool, check_threshold
from ..prompts.generate import PromptConfig, generate_prompts, load_prompt_texts
from ..prompts.offline import OfflineBackend, is_world_skill
from ..skills import Skill, resolve_skill

PROMPT_COLUMNS = ("prompt", "text", "caption")
ID_COLUMNS = ("id", "prompt_id", "item_id")
SKILL_COLUMNS = ("skill", "category")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt")


@dataclass(frozen=True)
class PromptSpec:
    """Where the evaluation prompts come from; recorded in ``scores.json``.

    files: user prompt files (see the module doc).
    heldout_skills: skills (ids, skill files or Skill objects) to write ``heldout_count`` new prompts
        for, with ``heldout_seed`` and the offline writer unless a chat backend is passed.
    train_prompts: the training prompt files (.jsonl/.json/.txt) evaluation prompts must not copy.
    threshold: ROUGE-L F above which a prompt counts as a copy of a training prompt (SELMA: 0.8).
    skill / prompt_column: for files without a skill column / to name the prompt column.
    max_per_skill: keep the first N prompts of each skill (0: all).
    """

    files: tuple[str, ...] = ()
    heldout_skills: tuple[str | Skill, ...] = ()
    heldout_count: int = 20
    heldout_seed: int = 1000
    train_prompts: tuple[str, ...] = ()
    threshold: float = 0.8
    skill: str = ""
    prompt_column: str = ""
    max_per_skill: int = 0
    skills_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("files", "heldout_skills", "train_prompts"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike, Skill)):
                raise invalid(name, value, "a list (one entry is a list of one)")
            object.__setattr__(self, name, tuple(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value))
        if not self.files and not self.heldout_skills:
            raise invalid("prompts", "none", "prompt files, held-out skills, or both",
                          "give a prompts file (JSON, JSONL, CSV) or a skill to write held-out prompts for")
        for name in ("files", "train_prompts"):
            for path in getattr(self, name):
                if not Path(path).is_file():
                    raise invalid(name, path, "existing files", "check the path")
        for path in self.files:
            if Path(path).suffix.lower() not in FILE_SUFFIXES:
                raise invalid("files", path, f"a prompts file ending in {', '.join(FILE_SUFFIXES)}")
        object.__setattr__(self, "heldout_skills", tuple(resolve_skill(s, self.skills_dir) for s in self.heldout_skills))
        if self.heldout_skills and not self.train_prompts:
            raise invalid("train_prompts", [], "the training prompt files of the held-out skills",
                          "held-out prompts are checked against them; without them nothing says they are held out")
        check_int("heldout_count", self.heldout_count, 1, 100_000)
        check_int("heldout_seed", self.heldout_seed, 0, 2**63 - 1)
        check_int("max_per_skill", self.max_per_skill, 0, 10_000_000)
        check_threshold(self.threshold, "threshold")
        for name in ("skill", "prompt_column"):
            if not isinstance(getattr(self, name), str):
                raise invalid(name, getattr(self, name), "a string ('' for automatic)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["heldout_skills"] = [s.to_dict() for s in self.heldout_skills]  # type: ignore[union-attr]
        return d


@dataclass
class PromptSet:
    """The prompt rows ``{id, skill, prompt, source}`` to evaluate, and what was dropped on the way."""

    rows: list[dict[str, Any]]
    contaminated: list[dict[str, Any]] = field(default_factory=list)  # {id, skill, prompt, train_prompt, rouge_l}
    files: dict[str, str] = field(default_factory=dict)  # where each source's prompts were read or written

    def skills(self) -> list[str]:
        return list(dict.fromkeys(r["skill"] for r in self.rows))


def collect_prompts(spec: PromptSpec, workdir: str | os.PathLike[str], *, backend: Any = None) -> PromptSet:
    """Held-out prompts (written to ``workdir/heldout-<skill>.jsonl``) + file prompts, checked against training."""
    train = [t for p in spec.train_prompts for t in load_prompt_texts(p)]
    rows: list[dict[str, Any]] = []
    files: dict[str, str] = {}
    for skill in spec.heldout_skills:
        assert isinstance(skill, Skill)
        out = Path(workdir) / f"heldout-{slug(skill.id)}.jsonl"
        rows += heldout_prompts(skill, spec.heldout_count, out, seed=spec.heldout_seed, train_prompts=spec.train_prompts,
                                threshold=spec.threshold, backend=backend)
        files[f"heldout:{skill.id}"] = str(out)
    for path in spec.files:
        rows += load_eval_prompts(path, skill=spec.skill, prompt_column=spec.prompt_column)
        files[f"file:{Path(path).name}"] = str(path)
    _check_unique_ids(rows)
    hits = find_contaminated(rows, train, spec.threshold)
    bad = {h["id"] for h in hits}
    rows = [r for r in rows if r["id"] not in bad]
    rows = _limit_per_skill(rows, spec.max_per_skill)
    if not rows:
        raise SelmaError(f"no evaluation prompts left: {len(hits)} of them nearly copy training prompts "
                         f"(ROUGE-L F > {spec.threshold}); use held-out prompts")
    return PromptSet(rows, hits, files)


def heldout_prompts(skill: Skill, count: int, out_path: str | os.PathLike[str], *, seed: int,
                    train_prompts: Sequence[str], threshold: float = 0.8, backend: Any = None) -> list[dict[str, Any]]:
    """Write ``count`` new prompts for ``skill`` with ``seed`` to ``out_path``, none close to a training prompt.

    Stage 1's contamination guard rejects candidates whose ROUGE-L F with a training prompt is above
    ``threshold``. A training file made with this very seed for this skill is refused (it would be
    the same prompts). ``backend``: a chat backend, else the offline writer.
    """
    out = Path(out_path)
    if out.exists():
        raise SelmaError(f"{out}: exists already; held-out prompts are written fresh for each evaluation")
    for path in train_prompts:
        if Path(path).suffix.lower() == ".jsonl":
            same = [r for r in read_jsonl(path) if r.get("skill") == skill.id and r.get("seed") == seed]
            if same:
                raise invalid("heldout_seed", seed, f"a seed other than the one {path} was generated with",
                              "the same seed writes the same prompts; e.g. add 1000")
    guard = out.with_name(out.stem + ".train.json")  # stage 1 reads one guard file: all training prompts
    atomic_write_json(guard, [t for p in train_prompts for t in load_prompt_texts(p)], overwrite=False)
    if backend is None and is_world_skill(skill.id):
        backend = OfflineBackend(skill, split="heldout")  # a world skill: the world's own held-out prompts
    llm = "offline" if backend is None else _backend_name(backend)
    config = PromptConfig(skill=skill, count=count, llm=llm, seed=seed, eval_prompts=str(guard),
                          eval_threshold=threshold)
    generate_prompts(config, out, backend=backend)
    rows = [{"id": r["id"], "skill": skill.id, "prompt": r["prompt"], "source": f"heldout:{r.get('source', llm)}"}
            for r in read_jsonl(out)]
    train = [t for p in train_prompts for t in load_prompt_texts(p)]
    if find_contaminated(rows, train, threshold):  # the guard should have rejected these: never score them
        raise SelmaError(f"{out}: held-out prompts still match training prompts; this is a bug, please report it")
    return rows


def skill_of_prompts(path: str | os.PathLike[str], skill_id: str, skills_dir: str | os.PathLike[str] | None = None) -> Skill:
    """The skill a stage-1 prompts file was written for: the definition recorded in its report
    (``prompts.report.json``, which also covers skills typed into a node), else ``skill_id`` resolved."""
    from ..prompts.generate import report_path

    report = report_path(path)
    try:
        recorded = json.loads(report.read_text(encoding="utf-8"))["config"]["skill"]
        if recorded.get("id") == skill_id:
            return Skill(**recorded)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no report, or not one we understand: fall back to the id
    return resolve_skill(skill_id, skills_dir)


def _backend_name(backend: Any) -> str:
    source = str(getattr(backend, "source", ""))
    name = source.split(":", 1)[0]
    from ..prompts.generate import backend_names

    return name if name in backend_names() else "openai"


def find_contaminated(rows: Sequence[dict[str, Any]], train: Sequence[str], threshold: float = 0.8) -> list[dict[str, Any]]:
    """Rows whose prompt has ROUGE-L F > ``threshold`` with a training prompt (stage 1's guard), with the match."""
    if not train:
        return []
    pool = RougePool(threshold, train)
    hits = []
    for row in rows:
        found = pool.find(row["prompt"])
        if found is not None:
            hits.append({"id": row["id"], "skill": row["skill"], "prompt": row["prompt"],
                         "train_prompt": train[found[0]], "rouge_l": round(found[1], 4)})
    return hits


# --- user files ---------------------------------------------------------------------------------------


def load_eval_prompts(path: str | os.PathLike[str], *, skill: str = "", prompt_column: str = "") -> list[dict[str, Any]]:
    """Rows ``{id, skill, prompt, source}`` from a prompts file (see the module doc); errors name file and column."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise invalid("prompts", str(path), f"a file ending in {', '.join(FILE_SUFFIXES)}")
    records = _read_records(path, suffix)
    if not records:
        raise SelmaError(f"{path}: no prompts in it")
    default_skill = skill.strip() or slug(path.stem)
    rows: dict[str, dict[str, Any]] = {}
    columns = _columns(path, records, prompt_column)
    for i, record in enumerate(records, 1):
        row = _row(path, i, record, columns, default_skill)
        other = rows.get(row["id"])
        if other is not None and (other["prompt"], other["skill"]) != (row["prompt"], row["skill"]):
            raise SelmaError(f"{path}, row {i}: id {row['id']!r} is used for two different prompts; ids must be unique")
        rows.setdefault(row["id"], row)
    return list(rows.values())


def _read_records(path: Path, suffix: str) -> list[Any]:
    try:
        if suffix == ".jsonl":
            return read_jsonl(path)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"id": "prompt"} or {"id": {...}}, as TIFA's files are keyed
                return [{"id": k, **v} if isinstance(v, dict) else {"id": k, "prompt": v} for k, v in data.items()]
            if not isinstance(data, list):
                raise SelmaError(f"{path}: the top level must be a list of prompts or an object of id -> prompt")
            return data
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8-sig", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except json.JSONDecodeError as e:
        raise SelmaError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise SelmaError(f"{path}: cannot be read as UTF-8 {suffix[1:].upper()} ({e})") from e


def _columns(path: Path, records: list[Any], prompt_column: str) -> dict[str, str | None]:
    """Which keys hold prompt, id and skill (case-insensitive), from the union of the records' keys."""
    keys = list(dict.fromkeys(k for r in records if isinstance(r, dict) for k in r if isinstance(k, str)))
    lower = {k.lower(): k for k in reversed(keys)}
    if prompt_column:
        if prompt_column.lower() not in lower:
            raise invalid("prompt_column", prompt_column, keys or ["(no columns)"], f"the columns of {path}")
        prompt = lower[prompt_column.lower()]
    elif all(isinstance(r, str) for r in records):
        prompt = None
    else:
        prompt = next((lower[c] for c in PROMPT_COLUMNS if c in lower), None)
        if prompt is None:
            raise SelmaError(f"{path}: no prompt column; its columns are {keys}; allowed: "
                             f"{', '.join(PROMPT_COLUMNS)} (any case), or name it with prompt_column")
    return {"prompt": prompt, "id": next((lower[c] for c in ID_COLUMNS if c in lower), None),
            "skill": next((lower[c] for c in SKILL_COLUMNS if c in lower), None)}


def _row(path: Path, i: int, record: Any, columns: dict[str, str | None], default_skill: str) -> dict[str, Any]:
    if isinstance(record, str):
        text, rid, skill = record, None, None
    elif isinstance(record, dict):
        text = record.get(columns["prompt"]) if columns["prompt"] else None
        rid = record.get(columns["id"]) if columns["id"] else None
        skill = record.get(columns["skill"]) if columns["skill"] else None
    else:
        raise SelmaError(f"{path}, row {i}: got {type(record).__name__}; allowed: a string or an object")
    if not isinstance(text, str) or not text.strip():
        raise SelmaError(f"{path}, row {i}: column {columns['prompt'] or 'prompt'!r} is empty; every row needs a prompt")
    rid = str(rid).strip() if rid not in (None, "") else f"{slug(path.stem)}-{i:05d}"
    skill = str(skill).strip() if skill not in (None, "") else default_skill
    return {"id": rid, "skill": skill, "prompt": " ".join(text.split()), "source": f"file:{path.name}"}


def _check_unique_ids(rows: list[dict[str, Any]]) -> None:
    seen: dict[str, str] = {}
    for row in rows:
        if row["id"] in seen:
            raise SelmaError(f"prompt id {row['id']!r} comes from both {seen[row['id']]} and {row['source']}; "
                             "ids must be unique across the evaluation's prompt sources")
        seen[row["id"]] = row["source"]


def _limit_per_skill(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    if not limit:
        return rows
    counts: dict[str, int] = {}
    out = []
    for row in rows:
        counts[row["skill"]] = counts.get(row["skill"], 0) + 1
        if counts[row["skill"]] <= limit:
            out.append(row)
    return out

