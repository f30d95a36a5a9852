"""Stage 1: the in-context generation loop (SELMA Sec. 3.1, after Self-Instruct).

Each request shows ``examples_per_request`` prompts sampled from the growing pool (the skill's seed
examples + every accepted prompt) and asks for a numbered batch of new ones. Replies are parsed
(:mod:`.parse`), screened (word limit, copies of the shown examples), checked against the blocklist
and the evaluation prompts, and deduplicated with ROUGE-L exactly as SELMA does (:mod:`.dedup`).

Output: ``prompts.jsonl``, one row a line::

    {"id": "coco-000042", "skill": "coco", "prompt": "...", "source": "offline", "seed": 0,
     "request": 7, "shown": ["coco-seed-1", "coco-000013", "coco-seed-0"]}

appended (fsynced) after every request, so a killed run keeps every row written. Re-running towards
a larger ``count`` puts the existing rows into the pool and continues the numbering. A report
(``prompts.report.json`` beside it) counts requests, candidates and every rejection reason.

Reproducibility: the examples shown in request ``r`` and the seed passed to the model depend only on
(run seed, skill, r) and the pool, so with the deterministic ``offline`` backend the same seed writes
a byte-identical file -- also when a run is stopped/killed and resumed, because a resumed run first
re-issues its last request (same shown examples, same seed) to finish a batch cut at ``count``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SelmaError, invalid
from ..fsio import append_jsonl, atomic_write_json, read_jsonl
from ..llm.base import ChatBackend, ChatMessage
from ..skills import Skill, resolve_skill
from .dedup import RougePool, check_threshold
from .parse import extract_items, screen

REASON_NEAR_DUPLICATE = "near_duplicate"
REASON_BLOCKLIST = "blocklist"
REASON_CONTAMINATION = "contamination"
#: Automatic request budget: this many times the requests a perfect model would need, plus slack.
BUDGET_FACTOR = 5
BUDGET_SLACK = 5


def backend_names() -> list[str]:
    """Names for ``--llm`` and the node dropdown: ``offline`` plus the registered chat backends."""
    try:
        from ..llm.backends import CHAT_BACKENDS
    except ImportError:  # the llm backends module is optional for offline use
        return ["offline"]
    return ["offline", *(n for n in CHAT_BACKENDS.names() if n != "offline")]


@dataclass(frozen=True)
class PromptConfig:
    """Everything stage 1 needs; validated on construction and recorded in the report."""

    skill: str | Skill  # an id, a skill file path, or a Skill; stored resolved (a Skill)
    count: int = 100  # rows the output file should hold when done
    llm: str = "offline"  # recorded; generate_prompts builds only the offline backend itself
    seed: int = 0
    examples_per_request: int = 3  # k in-context examples per request (SELMA: 3)
    batch_size: int = 20  # prompts asked for per request (SELMA: 20)
    dedup_threshold: float = 0.8  # drop when ROUGE-L F against the pool > this (SELMA: 0.8)
    temperature: float = 1.0
    max_tokens: int = 2048
    max_requests: int = 0  # 0: automatic, BUDGET_FACTOR x the requests a perfect model needs
    min_words: int = 3
    blocklist: tuple[str, ...] = ()  # terms (whole words, any case) or "re:<regex>"
    eval_prompts: str | None = None  # .txt / .jsonl / .json of evaluation prompts to stay away from
    eval_threshold: float = 0.8  # drop when ROUGE-L F against an evaluation prompt > this
    skills_dir: str | None = None  # user skills folder used to resolve a skill id

    def __post_init__(self) -> None:
        object.__setattr__(self, "skill", resolve_skill(self.skill, self.skills_dir))
        _int("count", self.count, 1, 10_000_000)
        _int("seed", self.seed, 0, 2**63 - 1)
        _int("examples_per_request", self.examples_per_request, 1, 50)
        _int("batch_size", self.batch_size, 1, 500)
        _int("max_tokens", self.max_tokens, 16, 1_000_000)
        _int("max_requests", self.max_requests, 0, 10_000_000)
        _int("min_words", self.min_words, 1, 1000)
        if self.min_words >= self.skill.word_limit:
            raise invalid("min_words", self.min_words, f"less than the skill's word_limit ({self.skill.word_limit})")
        check_threshold(self.dedup_threshold)
        check_threshold(self.eval_threshold, "eval_threshold")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 2:
            raise invalid("temperature", self.temperature, "a number from 0 to 2")
        if self.llm not in backend_names():
            raise invalid("llm", self.llm, backend_names())
        if isinstance(self.blocklist, str):
            raise invalid("blocklist", self.blocklist, "a list of terms or 're:<regex>' entries, not one string")
        object.__setattr__(self, "blocklist", tuple(self.blocklist))
        compile_blocklist(self.blocklist)
        if self.eval_prompts is not None and not Path(self.eval_prompts).is_file():
            raise invalid("eval_prompts", self.eval_prompts, "an existing .txt (one prompt a line), .jsonl or .json file")

    @property
    def skill_obj(self) -> Skill:
        assert isinstance(self.skill, Skill)
        return self.skill

    def request_budget(self, remaining: int) -> int:
        if self.max_requests:
            return self.max_requests
        return math.ceil(remaining / self.batch_size) * BUDGET_FACTOR + BUDGET_SLACK

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skill"] = self.skill_obj.to_dict()
        d["blocklist"] = list(self.blocklist)
        return d


@dataclass
class PromptReport:
    """What a run did. ``rejected`` counts every reason a reply line or candidate was not kept."""

    skill: str
    out_path: str
    count: int
    existing: int  # rows in the file before this run
    written: int = 0  # rows this run appended
    requests: int = 0
    request_budget: int = 0
    candidates: int = 0  # items parsed out of replies
    unused: int = 0  # items left over in the last batch once count was reached
    rejected: dict[str, int] = field(default_factory=dict)
    blocklist_hits: dict[str, int] = field(default_factory=dict)
    status: str = "running"  # complete | stopped | budget_exhausted | failed
    message: str = ""
    source: str = ""
    elapsed_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.existing + self.written

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total"] = self.total
        return d


class PromptBudgetExhausted(SelmaError):
    """The request budget ran out before ``count`` prompts; the rows written so far are kept."""

    def __init__(self, message: str, report: PromptReport) -> None:
        super().__init__(message)
        self.report = report


def report_path(out_path: str | os.PathLike[str]) -> Path:
    """``prompts.jsonl`` -> ``prompts.report.json`` (beside it)."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.report.json")


def compile_blocklist(entries: tuple[str, ...]) -> list[tuple[str, re.Pattern[str]]]:
    """Entries as (entry, compiled pattern): ``re:<regex>`` as given, other terms as whole words."""
    out = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise invalid("blocklist", entry, "non-empty terms or 're:<regular expression>' entries")
        try:
            if entry.startswith("re:"):
                pattern = re.compile(entry[3:], re.IGNORECASE)
            else:
                pattern = re.compile(r"(?<!\w)" + re.escape(entry.strip()) + r"(?!\w)", re.IGNORECASE)
        except re.error as e:
            raise invalid("blocklist", entry, "a valid regular expression after 're:'", str(e)) from e
        out.append((entry, pattern))
    return out


def load_prompt_texts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a ``.txt`` (one a line), ``.jsonl`` (``prompt`` or ``text``) or ``.json`` list file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows: list[Any] = read_jsonl(path)
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SelmaError(f"{path}: not valid JSON ({e.msg}); give a list of prompts") from e
        if not isinstance(rows, list):
            raise SelmaError(f"{path}: the top level must be a list of prompts (strings or objects with 'prompt')")
    else:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = []
    for i, row in enumerate(rows, 1):
        text = row if isinstance(row, str) else row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise SelmaError(f"{path}, item {i}: no prompt text; give strings or objects with a 'prompt' field")
        texts.append(text)
    return texts


def build_messages(skill: Skill, shown: list[str], n: int) -> list[ChatMessage]:
    """The in-context request: the skill's rules, k numbered examples, a request for n more."""
    system = (
        "You write prompts for a text-to-image model, to teach it one skill.\n"
        f"Skill: {skill.name}.\nRules: {skill.instruction}\n"
        f"Every description must have fewer than {skill.word_limit} words."
    )
    examples = "\n".join(f"{i}. {text}" for i, text in enumerate(shown, 1))
    user = (
        f"Here are some example image descriptions:\n{examples}\n\n"
        f"Write {n} new image descriptions that follow the rules and differ from the examples and from "
        f"each other. Number them 1 to {n}, one per line. Reply with the numbered list only."
    )
    return [ChatMessage("system", system), ChatMessage("user", user)]


def derive_seed(seed: int, skill_id: str, request: int) -> int:
    """The seed passed to the model for request ``request``: stable across runs and platforms."""
    digest = hashlib.sha256(f"selma-request:{seed}:{skill_id}:{request}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class _State:
    """The pool (ids, texts, ROUGE index), the rows, and where numbering continues."""

    def __init__(self, config: PromptConfig, out: Path) -> None:
        skill = config.skill_obj
        self.ids = [f"{skill.id}-seed-{i}" for i in range(len(skill.examples))]
        self.texts = list(skill.examples)
        self.pool = RougePool(config.dedup_threshold, skill.examples)
        self.skill_id = skill.id
        self.rows = read_jsonl(out)
        for i, row in enumerate(self.rows, 1):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or row.get("skill", skill.id) != skill.id:
                got = row.get("skill") if isinstance(row, dict) else row
                raise SelmaError(
                    f"{out}, row {i}: not a prompt of skill {skill.id!r} (got {got!r}); "
                    "write to another --out file for another skill"
                )
            self.ids.append(str(row.get("id", f"{skill.id}-{i - 1:06d}")))
            self.texts.append(row["prompt"])
            self.pool.add(row["prompt"])
        self.by_id = dict(zip(self.ids, self.texts, strict=True))

    def resume_point(self) -> tuple[int, list[str] | None]:
        """(first request number, shown ids to re-issue it with, or None to sample them)."""
        if not self.rows or not isinstance(self.rows[-1].get("request"), int):
            return 0, None
        last = self.rows[-1]
        shown = last.get("shown")
        known = set(self.ids)
        if isinstance(shown, list) and shown and all(s in known for s in shown):
            return last["request"], [str(s) for s in shown]
        return last["request"] + 1, None

    def accept(self, prompt: str, source: str, seed: int, request: int, shown: list[str]) -> dict[str, Any]:
        """Record an accepted prompt (already added to the ROUGE pool) and return its row."""
        row_id = f"{self.skill_id}-{len(self.rows):06d}"
        row = {"id": row_id, "skill": self.skill_id, "prompt": prompt, "source": source,
               "seed": seed, "request": request, "shown": list(shown)}
        self.rows.append(row)
        self.ids.append(row_id)
        self.texts.append(prompt)
        self.by_id[row_id] = prompt
        return row

    def sample_shown(self, seed: int, skill_id: str, request: int, k: int) -> list[str]:
        rng = random.Random(f"selma-shown:{seed}:{skill_id}:{request}")
        return [self.ids[i] for i in rng.sample(range(len(self.ids)), min(k, len(self.ids)))]


def generate_prompts(
    config: PromptConfig,
    out_path: str | os.PathLike[str],
    *,
    backend: ChatBackend | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PromptReport:
    """Grow ``out_path`` to ``config.count`` prompts; return (and write) the report.

    ``backend``: any ChatBackend; None builds the offline one (only for ``llm="offline"``). The
    caller owns a backend it passes (it is not closed here). ``progress(rows, count)`` is called once
    per request; ``should_stop()`` is checked after every request and ends the run cleanly.
    Raises :class:`PromptBudgetExhausted` when the request budget runs out first.
    """
    skill = config.skill_obj
    out = Path(out_path)
    owned = backend is None
    if backend is None:
        if config.llm != "offline":
            raise invalid("backend", None, "a ChatBackend instance", f"build one for llm={config.llm!r} with selma_backend.llm.backends.make_chat_backend")
        from .offline import OfflineBackend

        backend = OfflineBackend(skill)
    try:
        return _run(config, out, backend, progress, should_stop)
    finally:
        if owned:
            backend.close()


class _Run:
    """One invocation: the state, the filters, the counters and the report."""

    def __init__(self, config: PromptConfig, out: Path, backend: ChatBackend) -> None:
        self.config = config
        self.skill = config.skill_obj
        self.out = out
        self.backend = backend
        self.state = _State(config, out)
        self.report = PromptReport(skill=self.skill.id, out_path=str(out), count=config.count,
                                   existing=len(self.state.rows), source=backend.source, config=config.to_dict())
        self.report.request_budget = config.request_budget(max(config.count - len(self.state.rows), 0))
        self.guard = RougePool(config.eval_threshold, load_prompt_texts(config.eval_prompts)) if config.eval_prompts else None
        self.blocklist = compile_blocklist(config.blocklist)
        self.rejected: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()

    def loop(self, progress: Callable[[int, int], None] | None, should_stop: Callable[[], bool] | None) -> None:
        config, report = self.config, self.report
        request, reissue = self.state.resume_point()
        while report.total < config.count:
            if report.requests >= report.request_budget:
                report.status = "budget_exhausted"
                report.message = _budget_message(config, report, self.rejected)
                return
            shown = reissue or self.state.sample_shown(config.seed, self.skill.id, request, config.examples_per_request)
            reissue = None
            rows = self.request(request, shown)
            append_jsonl(self.out, rows)  # fsynced: a kill after this line loses nothing
            report.written += len(rows)
            report.requests += 1
            request += 1
            if progress is not None:
                progress(min(report.total, config.count), config.count)
            if should_stop is not None and report.total < config.count and should_stop():
                report.status = "stopped"
                report.message = (f"stopped after {report.requests} requests; {report.total}/{config.count} "
                                  "prompts written, re-run to continue")
                return
        report.status = "complete"
        report.message = f"{report.total} prompts for skill {self.skill.id!r} in {self.out}"

    def request(self, request: int, shown: list[str]) -> list[dict[str, Any]]:
        """Ask once, and return the rows accepted from the reply (already in the pool)."""
        config, report, state = self.config, self.report, self.state
        shown_texts = [state.by_id[s] for s in shown]
        messages = build_messages(self.skill, shown_texts, config.batch_size)
        reply = self.backend.chat(messages, temperature=config.temperature, max_tokens=config.max_tokens,
                                  seed=derive_seed(config.seed, self.skill.id, request))
        items, parse_rejects = extract_items(reply)
        report.candidates += len(items)
        self.rejected.update(parse_rejects)
        kept, screen_rejects = screen(items, word_limit=self.skill.word_limit, min_words=config.min_words, shown=shown_texts)
        self.rejected.update(screen_rejects)
        rows: list[dict[str, Any]] = []
        for i, prompt in enumerate(kept):
            if report.total + len(rows) >= config.count:
                report.unused += len(kept) - i
                break
            reason = self.reject_reason(prompt)
            if reason:
                self.rejected[reason] += 1
                continue
            rows.append(state.accept(prompt, self.backend.source, config.seed, request, shown))
        return rows

    def reject_reason(self, prompt: str) -> str | None:
        """Blocklist, then evaluation-prompt contamination, then ROUGE-L dedup (which adds a keeper)."""
        blocked = [entry for entry, pattern in self.blocklist if pattern.search(prompt)]
        if blocked:
            self.hits.update(blocked)
            return REASON_BLOCKLIST
        if self.guard is not None and self.guard.find(prompt) is not None:
            return REASON_CONTAMINATION
        if not self.state.pool.offer(prompt):
            return REASON_NEAR_DUPLICATE
        return None

    def finish(self, started: float) -> None:
        self.report.rejected = dict(sorted(self.rejected.items()))
        self.report.blocklist_hits = dict(sorted(self.hits.items()))
        self.report.elapsed_s = round(time.monotonic() - started, 3)
        atomic_write_json(report_path(self.out), self.report.to_dict())


def _run(
    config: PromptConfig,
    out: Path,
    backend: ChatBackend,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> PromptReport:
    started = time.monotonic()
    run = _Run(config, out, backend)
    try:
        run.loop(progress, should_stop)
    except BaseException as e:
        run.report.status = "failed"
        run.report.message = f"{type(e).__name__}: {e}"
        raise
    finally:
        run.finish(started)
    if run.report.status == "budget_exhausted":
        raise PromptBudgetExhausted(run.report.message, run.report)
    return run.report


def _budget_message(config: PromptConfig, report: PromptReport, rejected: Counter[str]) -> str:
    top = ", ".join(f"{k}={v}" for k, v in rejected.most_common(3)) or "nothing parsed"
    return (
        f"request budget used up: {report.requests} requests gave {report.written} new prompts, "
        f"{report.total}/{config.count} in the file (rejections: {top}). The model keeps repeating "
        "itself or its replies cannot be parsed. Raise max_requests (--max-requests), raise the "
        "temperature, or use a stronger model; the prompts written so far are kept and a re-run continues."
    )


def _int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(name, value, f"an integer from {low} to {high}")
