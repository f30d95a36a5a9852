"""Turn what a chat model replies into candidate prompts, counting every line it throws away.

Real replies come as numbered lists in any style (``4.``, ``4)``, ``**4.**``, ``4\\.``, ``(4)``,
``Prompt 4:``), bullets, JSON arrays (bare or in code fences, of strings or of objects), with chatty
preambles and sign-offs, quotes around items, bold titles, word-count notes and blank lines.

:func:`extract_items` finds the items; :func:`screen` applies the skill's rules. Both return a
``Counter`` of rejection reasons (the ``REASON_*`` names) so the report can show where lines went.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable

from .dedup import rouge_tokens

REASON_EMPTY = "empty"
REASON_COMMENTARY = "commentary"
REASON_TOO_LONG = "too_long"
REASON_TOO_SHORT = "too_short"
REASON_COPY = "copy_of_example"

_FENCE = re.compile(r"^\s*(```|~~~)")
# A list marker: optional emphasis/heading marks, an optional "Prompt"-style label, the number with
# its terminator (4. 4) 4] 4: 4\. 4 - (4) [4]), optional closing emphasis, then space or a capital.
_NUMBERED = re.compile(
    r"""^\s*(?:(?P<em>[*_]{1,2})\s*)?(?:\#{1,6}\s*)?
    (?:(?:prompt|description|caption|image|item|example)\s*\#?\s*)?
    (?:\(\d{1,4}\)|\[\d{1,4}\]|\d{1,4}\s*(?:\\?[.)\]:]|\s[-\u2013\u2014]))
    (?(em)(?:\s*[*_]{1,2})?)
    (?:\s+|$|(?=[A-Z"\u201c'*]))""",
    re.IGNORECASE | re.VERBOSE,
)
_LABELLED = re.compile(r"^\s*(?:[*_]{1,2})?(?:prompt|description|caption)\s*(?:[*_]{1,2})?\s*:\s*(?:[*_]{1,2})?\s*", re.I)
_BULLET = re.compile(r"^\s*[-*+\u2022\u2023\u25e6\u00b7\u2013\u2014\u25aa\u25cf\u2043]\s+")
_HEADING = re.compile(r"^\s*#{1,6}\s")
_CHATTY = re.compile(
    r"^\W*(here\s+(are|is)\b|here's|(sure|certainly|of course|ok(ay)?|absolutely|great|alright)\s*[!,.:]|"
    r"below\s+(are|is)\b|i\s+hope\b|i've\b|i\s+have\s+(written|created|made|generated)|i\s+can\b|i'll\b|"
    r"hope\s+(these|this)\b|let\s+me\s+know|feel\s+free|notes?\s*:|these\s+(prompts|descriptions|captions)\b|"
    r"happy\s+to\b|enjoy\b|would\s+you\s+like|if\s+you\s+(need|want|would|like)|as\s+an\s+ai\b|"
    r"each\s+(prompt|description)\s+(is|has|uses|follows|stays)|all\s+(prompts|descriptions)\s+(are|have)|"
    r"(new\s+)?(image\s+)?(prompts|descriptions|captions)\s*:|(i'm|i\s+am)\s+sorry|sorry\b|i\s+can(no|')t\b|"
    r"unfortunately\b)",
    re.IGNORECASE,
)
_BOLD_TITLE = re.compile(r"^(\*\*|__)([^*_]{1,80}?)\1\s*[:\-\u2013\u2014]\s*(?=\S)")
_WORD_NOTE = re.compile(
    r"\s*[(\[]\s*(?:~?\d+\s*words?|words?\s*[:=]?\s*\d+|word\s+count\s*[:=]?\s*\d+)\s*[)\]]\s*$"
    r"|\s+[-\u2013\u2014]\s*\d+\s*words?\s*$",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "\u201c": "\u201d", "\u201e": "\u201d", "'": "'", "\u2018": "\u2019", "\u00ab": "\u00bb", "`": "`"}
_JSON_KEYS = ("prompt", "description", "caption", "text", "image_description")


def extract_items(reply: str) -> tuple[list[str], Counter[str]]:
    """Candidate prompts in reply order, and counts of what was not a candidate (empty, commentary)."""
    rejected: Counter[str] = Counter()
    reply = reply.replace("\r\n", "\n").replace("\r", "\n")
    found = _from_json(reply, rejected)
    if found is not None:
        items = found
    else:
        items = _from_lines(reply, rejected)
    out = []
    for raw in items:
        item = clean_item(raw)
        if item:
            out.append(item)
        else:
            rejected[REASON_EMPTY] += 1
    return out, rejected


def screen(
    items: Iterable[str], *, word_limit: int, min_words: int = 1, shown: Iterable[str] = ()
) -> tuple[list[str], Counter[str]]:
    """Keep items with ``min_words`` <= words < ``word_limit`` that are not copies of shown examples."""
    rejected: Counter[str] = Counter()
    shown_tokens = {tuple(rouge_tokens(s)) for s in shown}
    kept = []
    for item in items:
        n = len(item.split())
        if n >= word_limit:
            rejected[REASON_TOO_LONG] += 1
        elif n < min_words:
            rejected[REASON_TOO_SHORT] += 1
        elif tuple(rouge_tokens(item)) in shown_tokens:
            rejected[REASON_COPY] += 1
        else:
            kept.append(item)
    return kept, rejected


def clean_item(text: str) -> str:
    """Strip emphasis, bold titles, word-count notes, wrapping quotes and trailing JSON commas."""
    text = " ".join(text.split())
    for _ in range(3):  # layers come in any order: **"text"** , "**text**",
        before = text
        text = text.rstrip(",;").strip()
        text = _WORD_NOTE.sub("", text)
        text = _BOLD_TITLE.sub("", text)
        text = _unwrap(text)
        if text == before:
            break
    text = text.replace("**", "").replace("__", "")
    return text.strip()


def _unwrap(text: str) -> str:
    for left, right in (("**", "**"), ("__", "__"), ("*", "*"), ("_", "_")):
        if len(text) > 2 * len(left) and text.startswith(left) and text.endswith(right):
            return text[len(left) : -len(right)].strip()
    if len(text) >= 2 and text[0] in _QUOTES:
        close = _QUOTES[text[0]]
        body = text[1:]
        # "text." / "text". / "text" -- allow one punctuation mark after the closing quote
        if body.endswith(close):
            return body[: -len(close)].strip()
        if len(body) >= 2 and body[-2] == close and body[-1] in ".,;!":
            return body[:-2].strip()
    return text


def _from_json(reply: str, rejected: Counter[str]) -> list[str] | None:
    """Items of a JSON array (or an object holding one) in the reply; None when there is none."""
    start, end = reply.find("["), reply.rfind("]")
    spans = []
    if 0 <= start < end:
        spans.append((start, end + 1))
    ostart, oend = reply.find("{"), reply.rfind("}")
    if 0 <= ostart < oend and (not spans or ostart < start):
        spans.insert(0, (ostart, oend + 1))
    for a, b in spans:
        try:
            data = json.loads(reply[a:b])
        except json.JSONDecodeError:
            continue
        items = _json_items(data)
        if items is None:
            continue
        outside = (reply[:a] + "\n" + reply[b:]).split("\n")
        rejected[REASON_COMMENTARY] += sum(1 for line in outside if line.strip() and not _FENCE.match(line))
        return items
    return None


def _json_items(data: object) -> list[str] | None:
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        return _json_items(lists[0]) if len(lists) == 1 else None
    if not isinstance(data, list) or not data:
        return None
    items = []
    for el in data:
        if isinstance(el, str):
            items.append(el)
        elif isinstance(el, dict):
            value = next((el[k] for k in _JSON_KEYS if isinstance(el.get(k), str)), None)
            if value is None:
                value = next((v for v in el.values() if isinstance(v, str)), "")
            items.append(value)
        else:
            return None
    return items


def _from_lines(reply: str, rejected: Counter[str]) -> list[str]:
    lines = [line for line in reply.split("\n") if not _FENCE.match(line)]
    marked = [_marker_end(line) for line in lines]
    listed = sum(m is not None for m in marked) >= 2
    items: list[str] = []
    title_open = False  # the previous item was only a bold title; its description follows
    prev_item = False  # the previous non-blank line was an item (continuations attach to it)
    for line, end in zip(lines, marked, strict=True):
        if not line.strip():
            prev_item = False  # a title's description may still follow after a blank line
            continue
        if end is not None:
            body = line[end:].strip()
            if _is_header(body):
                rejected[REASON_COMMENTARY] += 1
                prev_item = title_open = False
                continue
            title_open = _is_title(body)
            items.append(body)
            prev_item = True
            continue
        text = line.strip()
        if items and (title_open or (prev_item and line[:1].isspace() and listed)):
            # a description under a bold title (replaces it), or an indented continuation
            items[-1] = text if title_open else f"{items[-1]} {text}"
            title_open = False
            continue
        prev_item = title_open = False
        if listed or _HEADING.match(text) or _CHATTY.match(text) or text.endswith((":", "?")):
            rejected[REASON_COMMENTARY] += 1
        else:
            items.append(text)
    return items


def _marker_end(line: str) -> int | None:
    for pattern in (_NUMBERED, _BULLET, _LABELLED):
        m = pattern.match(line)
        if m:
            return m.end()
    return None


def _is_header(body: str) -> bool:
    """A list entry that introduces others ("1. Kitchen scenes:"), not a prompt."""
    plain = body.replace("*", "").replace("_", " ").strip()
    return plain.endswith(":") and len(plain.split()) <= 8


def _is_title(body: str) -> bool:
    """A list entry that is only a bold title (``1. **Morning Market**``) with the text below it."""
    m = re.fullmatch(r"(\*\*|__)([^*_]{1,80})\1", body.strip())
    if not m:
        return False
    inner = m.group(2).strip()
    return len(inner.split()) <= 8 and inner[-1] not in ".!?\"\u201d'" and inner[0] not in _QUOTES
