"""Benchmark: our ROUGE-L dedup (selma_backend.prompts.dedup) against SELMA's own algorithm.

Reference (SELMA ``llm/prompt_generation.py``): tokenize every pool prompt once with
``rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)._tokenizer``; for each candidate compute
``rouge_scorer._score_lcs(candidate_tokens, t).fmeasure`` against every pool member, drop it when
the max is > 0.8, else append it to the pool. SELMA maps the pair scores over a fresh
``multiprocessing.Pool(16)`` per candidate; on our 2 cores that only adds process start-up, so the
reference here scores pair by pair in one process (the faster, fairer baseline).

Workload: prompts from the offline generator (all built-in skills, mixed), 35% of them followed by a
near-copy (a word dropped, replaced or swapped, case and punctuation changed), so both keep and drop
decisions are exercised. The pool starts with the skills' seed examples, as in a run.

    .venv/bin/python bench/bench_dedup.py          # full: reference at 1,000, ours at 1,000 and 10,000
    .venv/bin/python bench/bench_dedup.py --quick  # reference at 300, ours at 300 and 2,000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selma_backend.prompts.dedup import RougePool  # noqa: E402
from selma_backend.prompts.offline import offline_prompts  # noqa: E402
from selma_backend.skills import builtin_skills  # noqa: E402

THRESHOLD = 0.8


def workload(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(seed examples, n candidate prompts with near-duplicates mixed in), deterministic."""
    skills = list(builtin_skills().values())
    seeds = [e for s in skills for e in s.examples]
    per_skill = [iter(offline_prompts(s, n, seed)) for s in skills]
    rng = random.Random(seed)
    filler = ["small", "old", "bright", "quiet", "wet", "shiny", "the", "two"]
    out: list[str] = []
    while len(out) < n:
        text = next(per_skill[len(out) % len(skills)])
        out.append(text)
        if rng.random() < 0.35 and len(out) < n:
            words = text.split()
            i = rng.randrange(len(words))
            op = rng.randrange(4)
            if op == 0 and len(words) > 3:
                del words[i]
            elif op == 1:
                words[i] = rng.choice(filler)
            elif op == 2 and i + 1 < len(words):
                words[i], words[i + 1] = words[i + 1], words[i]
            else:
                words = [w.upper() if rng.random() < 0.3 else w for w in words]
            out.append(" ".join(words).rstrip(".") + rng.choice(["", ".", "!"]))
    return seeds, out


def reference_keep(seeds: list[str], candidates: list[str], threshold: float = THRESHOLD) -> list[bool]:
    """SELMA's loop with rouge_score itself, pair by pair."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool_tokens = [scorer._tokenizer.tokenize(s) for s in seeds]
    keep = []
    for text in candidates:
        tokens = scorer._tokenizer.tokenize(text)
        scores = [rouge_scorer._score_lcs(tokens, t).fmeasure for t in pool_tokens]
        if max(scores) > threshold:
            keep.append(False)
            continue
        keep.append(True)
        pool_tokens.append(tokens)
    return keep


def ours_keep(seeds: list[str], candidates: list[str], threshold: float = THRESHOLD) -> list[bool]:
    pool = RougePool(threshold, seeds)
    return [pool.offer(t) for t in candidates]


def _timed(fn: Callable[..., list[bool]], *args: list[str]) -> tuple[list[bool], float]:
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def run(quick: bool = False, repeats: int | None = None, n: int | None = None, tiny: bool = False) -> dict:
    """Measure and print the table; return figures for bench/run.py (throughput in prompts/s).

    ``repeats``: alternate reference and ours that many times and report the medians (default: one
    of each); ``n``: candidates compared (default 300 with ``quick``, else 1,000); ``tiny``: 100
    candidates and 300 for ours alone (tests).
    """
    n_ref = n or (100 if tiny else 300 if quick else 1000)
    n_big = 300 if tiny else 2000 if quick else 10_000
    rows = []
    seeds, cands = workload(n_ref)
    t_refs, t_ourss, same = [], [], True
    for _ in range(repeats or 1):
        ref, t_ref = _timed(reference_keep, seeds, cands)
        ours, t_ours = _timed(ours_keep, seeds, cands)
        t_refs.append(t_ref)
        t_ourss.append(t_ours)
        same = same and ours == ref
    t_ref, t_ours = statistics.median(t_refs), statistics.median(t_ourss)
    rows.append((n_ref, t_ref, t_ours, same, sum(ours)))
    seeds_b, cands_b = workload(n_big)
    ours_b, t_big = _timed(ours_keep, seeds_b, cands_b)
    rows.append((n_big, None, t_big, None, sum(ours_b)))
    print(f"ROUGE-L dedup, threshold {THRESHOLD}, pool starts with {len(seeds)} seeds; {os.cpu_count()} CPUs"
          + (f"; median of {repeats}" if repeats else ""))
    print(f"{'N':>7} {'kept':>6} {'reference s':>12} {'ours s':>9} {'ratio':>8} {'same_output':>12}")
    for n_, tr, to, same_, kept in rows:
        ref_s = "-" if tr is None else f"{tr:.2f}"
        ratio = "-" if tr is None else f"{tr / to:.0f}x"
        print(f"{n_:>7} {kept:>6} {ref_s:>12} {to:>9.3f} {ratio:>8} {'-' if same_ is None else str(same_):>12}")
    return {
        "ours": n_ref / t_ours,
        "reference": n_ref / t_ref,
        "unit": "prompts/s",
        "ratio": t_ref / t_ours,
        "same_output": same,
        "n": n_ref,
        f"ours_{n_big}_s": t_big,
        "repeats": repeats or 1,
        "ours_s": t_ourss,
        "reference_s": t_refs,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    result = run(parser.parse_args().quick)
    print(json.dumps(result))
