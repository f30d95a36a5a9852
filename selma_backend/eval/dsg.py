"""A DSG-style question score: does the image show what the prompt says, fact by fact?

After Davidsonian Scene Graph (Cho et al., "Davidsonian Scene Graph: Improving Reliability in
Fine-grained Evaluation for Text-to-Image Generation", ICLR 2024): a language model turns each prompt
into atomic yes/no questions with dependencies -- entities first, then their attributes, counts and
relations, each naming the questions it depends on ("Is the dog brown?" depends on "Is there a
dog?") -- and a vision-language model answers each question on the image. A question whose parent
failed counts as failed (it is not even asked). The image's score is the share of its questions
that passed; per category (``CATEGORIES``) likewise.

The questions of a prompt are written once and used for every model, so scores are paired. The
instructions below are written for this pack (the paper's own prompt is a long few-shot listing);
the reply format is JSON, parsed leniently (code fences and chatter around it are ignored).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import SelmaError
from ..llm.base import ChatBackend, ChatMessage, LLMError

CATEGORIES = ("entity", "attribute", "count", "relation", "global")
#: Words models use for a category, mapped to ours.
CATEGORY_ALIASES = {"entities": "entity", "object": "entity", "objects": "entity", "whole": "entity",
                    "part": "entity", "attributes": "attribute", "color": "attribute", "colour": "attribute",
                    "shape": "attribute", "material": "attribute", "state": "attribute", "texture": "attribute",
                    "counting": "count", "number": "count", "counts": "count", "quantity": "count",
                    "relations": "relation", "spatial": "relation", "action": "relation", "relationship": "relation",
                    "style": "global", "scene": "global", "other": "global"}
QUESTION_TRIES = 3  # a reply that cannot be parsed is asked for again (another seed), this many times in all

SYSTEM = (
    "You turn a text-to-image prompt into yes/no questions that check, one fact at a time, whether an image "
    "shows what the prompt says (as in Davidsonian Scene Graph evaluation).\n"
    "Rules:\n"
    "- One atomic fact per question, answerable with yes or no by looking at the image.\n"
    "- First one 'entity' question per object or person (\"Is there a dog?\").\n"
    "- Then 'attribute' (colour, material, size, state), 'count' (how many) and 'relation' (position, action "
    "between entities) questions, and 'global' ones for style or the whole scene.\n"
    "- 'parents' lists the ids of the questions a question depends on: an attribute or count depends on its "
    "entity, a relation on both entities. Entity and global questions have no parents.\n"
    "- Ask only about what the prompt states.\n"
    "Reply with JSON only, no other text:\n"
    '{"questions": [{"id": 1, "category": "entity", "question": "...", "parents": []}, ...]}'
)
EXAMPLE_PROMPT = "two red apples to the left of a blue mug"
EXAMPLE_REPLY = json.dumps({"questions": [
    {"id": 1, "category": "entity", "question": "Are there apples?", "parents": []},
    {"id": 2, "category": "entity", "question": "Is there a mug?", "parents": []},
    {"id": 3, "category": "count", "question": "Are there exactly two apples?", "parents": [1]},
    {"id": 4, "category": "attribute", "question": "Are the apples red?", "parents": [1]},
    {"id": 5, "category": "attribute", "question": "Is the mug blue?", "parents": [2]},
    {"id": 6, "category": "relation", "question": "Are the apples to the left of the mug?", "parents": [1, 2]},
]})
ANSWER_SYSTEM = "Look at the image and answer the question with one word: yes or no."


@dataclass(frozen=True)
class Question:
    id: int
    category: str  # one of CATEGORIES
    text: str
    parents: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "parents": list(self.parents)}


@dataclass
class ImageScore:
    """The DSG result of one image: raw answers, what passed after dependencies, and the scores."""

    answers: dict[int, str]  # id -> "yes" | "no" | "unclear: <text>" | "skipped" (a parent failed)
    passed: dict[int, bool]
    score: float
    categories: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"answers": {str(k): v for k, v in self.answers.items()},
                "passed": {str(k): v for k, v in self.passed.items()}, "score": self.score,
                "categories": self.categories}


# --- questions ------------------------------------------------------------------------------------


def question_messages(prompt: str) -> list[ChatMessage]:
    """The request for one prompt's questions: rules, one worked example, the prompt."""
    return [ChatMessage("system", SYSTEM), ChatMessage("user", f"Prompt: {EXAMPLE_PROMPT}"),
            ChatMessage("assistant", EXAMPLE_REPLY), ChatMessage("user", f"Prompt: {prompt}")]


def parse_questions(reply: str, limit: int = 200) -> list[Question]:
    """Questions from a reply (JSON, possibly fenced or with text around it), in dependency order.

    Raises ``ValueError`` saying what is wrong: no JSON, no questions, an unknown category, a parent
    that does not exist, a cycle. At most ``limit`` questions are kept (those whose parents are kept).
    """
    data = _json_object(reply)
    items = data.get("questions") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ValueError("no 'questions' list in the reply")
    questions = [_question(item, i) for i, item in enumerate(items, 1)]
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"question ids repeat: {ids}")
    for q in questions:
        missing = [p for p in q.parents if p not in ids or p == q.id]
        if missing:
            raise ValueError(f"question {q.id} depends on {missing}, which is not another question")
    ordered = topological(questions)
    kept: list[Question] = []
    for q in ordered:
        if len(kept) < limit and all(p in {k.id for k in kept} for p in q.parents):
            kept.append(q)
    return kept


def _json_object(reply: str) -> Any:
    text = reply.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError("no JSON in the reply")
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0]
    except json.JSONDecodeError as e:
        raise ValueError(f"the JSON in the reply does not parse ({e.msg})") from e


def _question(item: Any, position: int) -> Question:
    if not isinstance(item, dict):
        raise ValueError(f"question {position} is not an object")
    text = item.get("question")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"question {position} has no text")
    raw_category = str(item.get("category", "")).strip().lower()
    category = CATEGORY_ALIASES.get(raw_category, raw_category)
    if category not in CATEGORIES:
        raise ValueError(f"question {position} has category {raw_category!r}; allowed: {', '.join(CATEGORIES)}")
    try:
        qid = int(item.get("id", position))
        parents = tuple(int(p) for p in (item.get("parents") or []))
    except (TypeError, ValueError):
        raise ValueError(f"question {position}: id and parents must be integers") from None
    return Question(qid, category, " ".join(text.split()), parents)


def topological(questions: Sequence[Question]) -> list[Question]:
    """Parents before children, otherwise the given order (Kahn's algorithm); a cycle is a ValueError."""
    by_id = {q.id: q for q in questions}
    done: set[int] = set()
    out: list[Question] = []
    while len(out) < len(questions):
        ready = [q for q in questions if q.id not in done and all(p in done for p in q.parents)]
        if not ready:
            raise ValueError(f"the dependencies form a cycle among {sorted(set(by_id) - done)}")
        out.append(ready[0])
        done.add(ready[0].id)
    return out


def generate_questions(llm: ChatBackend, prompt: str, *, seed: int, limit: int = 16) -> list[Question]:
    """Ask ``llm`` for ``prompt``'s questions; a reply that does not parse is asked again (another seed)."""
    problem = ""
    for attempt in range(QUESTION_TRIES):
        reply = llm.chat(question_messages(prompt), temperature=0.0, max_tokens=1024, seed=seed + attempt)
        try:
            return parse_questions(reply, limit)
        except ValueError as e:
            problem = f"{e}; the reply began {reply[:200]!r}"
    raise SelmaError(f"the question model ({llm.source}) gave no usable questions for {prompt!r} in {QUESTION_TRIES} "
                     f"tries: {problem}. Use a stronger instruction-following model for question_model")


# --- answers ----------------------------------------------------------------------------------------


def answer_messages(question: str, png: bytes) -> list[ChatMessage]:
    """One question about one image (the PNG bytes go in an OpenAI vision ``image_url`` part)."""
    return [ChatMessage("system", ANSWER_SYSTEM), ChatMessage("user", question, images=(png,))]


def parse_answer(text: str) -> bool | None:
    """"Yes." -> True, "no, it is not" -> False; anything else None (counted as failed, shown as unclear)."""
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return None
    return {"yes": True, "no": False}.get(words[0])


def score_image(vlm: ChatBackend, questions: Sequence[Question], png: bytes, *, seed: int) -> ImageScore:
    """Ask each question in dependency order; children of a failed question are not asked (failed)."""
    answers: dict[int, str] = {}
    raw: dict[int, bool] = {}
    for q in topological(questions):
        if not all(raw.get(p) for p in q.parents):
            answers[q.id] = "skipped"
            raw[q.id] = False
            continue
        try:
            text = vlm.chat(answer_messages(q.text, png), temperature=0.0, max_tokens=64, seed=seed)
        except LLMError as e:
            raise SelmaError(f"the vision model could not answer {q.text!r}: {e}") from e
        ok = parse_answer(text)
        answers[q.id] = {True: "yes", False: "no"}.get(ok, f"unclear: {text.strip()[:80]}")  # type: ignore[arg-type]
        raw[q.id] = bool(ok)
    passed = propagate(questions, raw)
    score, categories = dsg_scores(questions, passed)
    return ImageScore(answers, passed, score, categories)


def propagate(questions: Sequence[Question], raw: Mapping[int, bool]) -> dict[int, bool]:
    """A question passes when its own answer is yes and every ancestor passed (DSG's rule)."""
    passed: dict[int, bool] = {}
    for q in topological(questions):
        passed[q.id] = bool(raw.get(q.id)) and all(passed[p] for p in q.parents)
    return passed


def dsg_scores(questions: Sequence[Question], passed: Mapping[int, bool]) -> tuple[float, dict[str, float]]:
    """(share of questions passed, {category: share passed}) for the categories the questions have."""
    if not questions:
        raise ValueError("no questions to score")
    score = sum(passed[q.id] for q in questions) / len(questions)
    categories = {}
    for c in CATEGORIES:
        mine = [passed[q.id] for q in questions if q.category == c]
        if mine:
            categories[c] = sum(mine) / len(mine)
    return score, categories
