"""ROUGE-L near-duplicate filtering with exactly ``rouge_score``'s semantics, fast.

SELMA (``llm/prompt_generation.py``, after Self-Instruct) keeps a candidate prompt only when::

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [rouge_scorer._score_lcs(candidate_tokens, t).fmeasure for t in pool_tokens]
    keep = max(scores) <= 0.8          # dropped when max > threshold (strictly greater)

and then appends the kept candidate to the pool (seeds + kept prompts, in order). This module gives
the same keep/drop decision for every candidate:

* :func:`rouge_tokens` is ``rouge_score.tokenize.tokenize(text, None)`` (lowercase, every run of
  characters outside ``[a-z0-9]`` is a separator); :func:`rouge_l_f` repeats ``_score_lcs`` and
  ``scoring.fmeasure`` operation by operation, so the float (and a tie at the threshold) is the same.
* Speed: tokens are mapped to code points, so a prompt becomes a short ``str`` and rapidfuzz's
  bit-parallel ``Indel.normalized_similarity`` (= 2·LCS/(len_a+len_b), mathematically ROUGE-L F) screens
  the whole pool in C with a length bound (``score_cutoff``). The cutoff is lowered by 1e-4 so no pair
  whose exact F could exceed the threshold is skipped; every survivor is re-scored exactly.

Empty token lists score 0 against everything (``_score_lcs``), so they are never dropped and never
cause a drop (for thresholds >= 0).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from rapidfuzz import process
from rapidfuzz.distance import Indel, LCSseq

from ..errors import invalid

_TOKEN_RE = re.compile(r"[a-z0-9]+")
#: Safety margin for the C screen. rapidfuzz's ``score_cutoff`` comparison is not exact: a pair
#: scoring exactly 0.8 is rejected at cutoff 0.8 - 1e-9 (measured gaps up to 3e-8). 1e-4 is far
#: above that; pairs inside the margin are only re-scored exactly, so it costs nothing in results.
_SCREEN_MARGIN = 1e-4
_SURROGATES = range(0xD800, 0xE000)


def rouge_tokens(text: str) -> list[str]:
    """``rouge_score`` default tokenizer without stemmer: lower(), then runs of ``[a-z0-9]``."""
    # rouge_score: lower -> sub("[^a-z0-9]+", " ") -> split on whitespace -> keep ^[a-z0-9]+$ tokens;
    # after the substitution only [a-z0-9] runs and spaces remain, so findall gives the same list.
    return _TOKEN_RE.findall(text.lower())


def rouge_l_f(target: Sequence[object], prediction: Sequence[object]) -> float:
    """``rouge_scorer._score_lcs(target, prediction).fmeasure``, the same float operations."""
    if not target or not prediction:
        return 0.0
    lcs = LCSseq.similarity(target, prediction)
    precision = lcs / len(prediction)
    recall = lcs / len(target)
    if precision + recall > 0:  # scoring.fmeasure
        return 2 * precision * recall / (precision + recall)
    return 0.0


def check_threshold(threshold: float, field: str = "dedup_threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise invalid(field, threshold, "a number from 0 to 1 (a candidate is dropped when ROUGE-L F > this; SELMA uses 0.8)")
    return float(threshold)


class RougePool:
    """A growing pool of prompts; :meth:`offer` keeps a candidate unless it is a near-duplicate.

    ``max_similarity``/``find`` answer "which pool member has F > threshold?" without changing the
    pool, so the same machinery also guards against evaluation prompts (contamination).
    """

    def __init__(self, threshold: float = 0.8, texts: Iterable[str] = ()) -> None:
        self.threshold = check_threshold(threshold)
        self._vocab: dict[str, str] = {}
        self._texts: list[str] = []  # every member, in order
        self._codes: list[str] = []  # non-empty members only, encoded
        self._index: list[int] = []  # position in _texts of each _codes entry
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self._texts)

    @property
    def texts(self) -> list[str]:
        return list(self._texts)

    def _encode(self, tokens: list[str], *, grow: bool) -> str:
        chars = []
        vocab = self._vocab
        for tok in tokens:
            ch = vocab.get(tok)
            if ch is None:
                if not grow:
                    ch = "\U0010ffff"  # a token the pool has never seen: matches nothing there
                    # (the pool never assigns U+10FFFF: see the size check below)
                else:
                    n = len(vocab)
                    n += len(_SURROGATES) if n >= _SURROGATES.start else 0
                    if n >= 0x10FFFF:
                        raise RuntimeError("more than a million distinct tokens in one pool")
                    ch = vocab[tok] = chr(n)
            chars.append(ch)
        return "".join(chars)

    def add(self, text: str) -> None:
        """Put ``text`` into the pool without checking it (seeds, prompts from an earlier run)."""
        tokens = rouge_tokens(text)
        self._texts.append(text)
        if tokens:
            self._codes.append(self._encode(tokens, grow=True))
            self._index.append(len(self._texts) - 1)

    def find(self, text: str) -> tuple[int, float] | None:
        """The first pool member (position, exact F) whose ROUGE-L F with ``text`` exceeds the threshold."""
        tokens = rouge_tokens(text)
        if not tokens or not self._codes:
            return None
        query = self._encode(tokens, grow=False)
        cutoff = max(self.threshold - _SCREEN_MARGIN, 1e-12)
        hits = process.extract(query, self._codes, scorer=Indel.normalized_similarity, score_cutoff=cutoff, limit=None)
        best: tuple[int, float] | None = None
        for _, _, j in hits:
            f = _exact_f(query, self._codes[j])
            if f > self.threshold and (best is None or j < best[0]):
                best = (j, f)
        return None if best is None else (self._index[best[0]], best[1])

    def offer(self, text: str) -> bool:
        """Keep ``text`` (add it, return True) unless it is a near-duplicate of the pool (False)."""
        if self.find(text) is not None:
            return False
        self.add(text)
        return True


def _exact_f(target: str, prediction: str) -> float:
    # Same operations as rouge_l_f / rouge_score._score_lcs on the encoded token strings.
    lcs = LCSseq.similarity(target, prediction)
    precision = lcs / len(prediction)
    recall = lcs / len(target)
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def dedup(texts: Iterable[str], threshold: float = 0.8, pool: Iterable[str] = ()) -> list[bool]:
    """Keep mask for ``texts`` offered in order to a pool that starts with ``pool`` (e.g. the seeds)."""
    p = RougePool(threshold, pool)
    return [p.offer(t) for t in texts]
