"""ROUGE-L dedup: the same keep/drop decisions as rouge_score (SELMA's rule), ties included."""

from __future__ import annotations

import random

import pytest
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize

from selma_backend.errors import SelmaError
from selma_backend.prompts.dedup import RougePool, dedup, rouge_l_f, rouge_tokens

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)  # SELMA's scorer
WORDS = "a the red blue cat dog mug table on under left right of two three big small wooden glass".split()
TRICKY = ["", "   ", "!!!", "\u2014 \u2026", "Caf\u00e9 cr\u00e8me", "\u0130stanbul STREET", "\ufb01sh and chips",
          "3D-printed 4k mug", "don't stop", "A\tB\nC", "\u212a-pop", "naïve façade", "x_y z", "ÀÉÎ 12 ab"]


def reference_keep(texts, threshold, pool=()):
    """SELMA llm/prompt_generation.py: _score_lcs against every pool member, drop when max > threshold."""
    pool_tokens = [SCORER._tokenizer.tokenize(t) for t in pool]
    keep = []
    for text in texts:
        tokens = SCORER._tokenizer.tokenize(text)
        scores = [rouge_scorer._score_lcs(tokens, t).fmeasure for t in pool_tokens]
        if scores and max(scores) > threshold:
            keep.append(False)
        else:
            keep.append(True)
            pool_tokens.append(tokens)
    return keep


def near_duplicates(rng: random.Random, n: int) -> list[str]:
    """Short sentences and edits of them: replace/drop/insert/swap, case and punctuation noise."""
    out: list[str] = []
    while len(out) < n:
        if not out or rng.random() < 0.3:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        elif rng.random() < 0.05:
            text = rng.choice(TRICKY)
        else:
            words = rng.choice(out).split() or ["mug"]
            for _ in range(rng.randint(1, 2)):
                i = rng.randrange(len(words))
                op = rng.randrange(5)
                if op == 0:
                    words[i] = rng.choice(WORDS)
                elif op == 1 and len(words) > 1:
                    del words[i]
                elif op == 2:
                    words.insert(i, rng.choice(WORDS))
                elif op == 3 and i + 1 < len(words):
                    words[i], words[i + 1] = words[i + 1], words[i]
                else:
                    words[i] = words[i].upper() + rng.choice([",", ".", "!", "-"])
            text = " ".join(words)
        out.append(text)
    return out


def test_tokenizer_is_rouge_scores():
    rng = random.Random(1)
    texts = TRICKY + near_duplicates(rng, 300)
    for text in texts:
        assert rouge_tokens(text) == rouge_tokenize.tokenize(text, None) == SCORER._tokenizer.tokenize(text)


def test_f_measure_is_bit_identical_to_score_lcs():
    rng = random.Random(2)
    texts = near_duplicates(rng, 400)
    pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(3000)]
    for a, b in pairs:
        ta, tb = rouge_tokens(a), rouge_tokens(b)
        assert rouge_l_f(ta, tb) == rouge_scorer._score_lcs(ta, tb).fmeasure  # exact float equality


def test_ties_at_the_threshold_follow_rouge_floats():
    # 2*LCS/(a+b) == 0.8 exactly in rationals, but rouge's floats differ by an ulp either way:
    # LCS 4 of 5+5 tokens -> 0.8000000000000002 (> 0.8: dropped); LCS 6 of 7+8 -> 0.7999999999999999 (kept).
    base5 = "red cat on blue mug"
    dropped = "red cat on big mug"  # 4 of 5
    base7, kept8 = "a b c d e f g", "a b c d e f x y"  # LCS 6, lengths 7 and 8
    assert rouge_scorer._score_lcs(rouge_tokens(base5), rouge_tokens(dropped)).fmeasure > 0.8
    assert rouge_scorer._score_lcs(rouge_tokens(base7), rouge_tokens(kept8)).fmeasure < 0.8
    assert dedup([dropped], 0.8, pool=[base5]) == [False] == reference_keep([dropped], 0.8, [base5])
    assert dedup([kept8], 0.8, pool=[base7]) == [True] == reference_keep([kept8], 0.8, [base7])
    # an exact 0.8 (LCS 2 of 2+3 tokens) is not above the threshold: kept
    assert rouge_scorer._score_lcs(["a", "b"], ["a", "b", "c"]).fmeasure == 0.8
    assert dedup(["a b c"], 0.8, pool=["a b"]) == [True] == reference_keep(["a b c"], 0.8, ["a b"])


@pytest.mark.parametrize("threshold", [0.8, 0.7, 0.5, 0.0, 1.0])
def test_keep_lists_match_rouge_score_on_thousands_of_near_duplicates(threshold):
    rng = random.Random(int(threshold * 10) + 7)
    groups = [near_duplicates(rng, 25) for _ in range(120)]  # 3,000 candidates
    seeds = ["red cat on blue mug", "a b c d e f g", ""]
    drops = 0
    for texts in groups:
        ref = reference_keep(texts, threshold, seeds)
        assert dedup(texts, threshold, pool=seeds) == ref
        drops += ref.count(False)
    assert drops > 300 or threshold == 1.0  # the test exercises drops, not only keeps


def test_one_big_pool_matches_rouge_score():
    rng = random.Random(11)
    texts = near_duplicates(rng, 700)
    assert dedup(texts, 0.8) == reference_keep(texts, 0.8)


def test_empty_token_strings_never_drop_nor_are_dropped():
    pool = RougePool(0.8, ["", "!!!"])
    assert pool.offer("") and pool.offer("...") and pool.offer("a red mug") and pool.offer("\u2014")
    assert not pool.offer("A red mug!")
    assert len(pool) == 6 and pool.find("") is None


def test_find_reports_the_pool_member_and_exact_score():
    pool = RougePool(0.5, ["a red mug on a table", "two dogs in a park"])
    pos, f = pool.find("two dogs in the park")
    assert pos == 1 and f == rouge_scorer._score_lcs(rouge_tokens("two dogs in the park"), rouge_tokens("two dogs in a park")).fmeasure
    assert pool.find("a lighthouse at dusk") is None
    assert len(pool) == 2  # find does not add


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.8", True])
def test_threshold_validated(bad):
    with pytest.raises(SelmaError, match="dedup_threshold"):
        RougePool(bad)
