"""Stage-6 statistics against hand-computed values: quantiles, resampled means, bootstrap intervals,
paired differences, verdicts, and the per-skill summary built from per-image scores."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from selma_backend.errors import SelmaError
from selma_backend.eval.config import EvalConfig
from selma_backend.eval.models import ModelEntry
from selma_backend.eval.stats import (
    Estimate,
    bootstrap_ci,
    derive_seed,
    paired_difference,
    per_prompt_means,
    percentile_interval,
    resample_indices,
    resampled_means,
    verdict,
)
from selma_backend.eval.summary import summarize, text_table


def test_percentile_interval_is_numpy_type_7_by_hand():
    # sorted [1, 1.5, 2.5, 4]; type 7: h = (n-1) p, value = x[floor h] + frac(h) (x[ceil h] - x[floor h])
    # p=0.25: h=0.75 -> 1 + 0.75*0.5 = 1.375;  p=0.75: h=2.25 -> 2.5 + 0.25*1.5 = 2.875
    assert percentile_interval([4, 1, 2.5, 1.5], confidence=0.5) == pytest.approx((1.375, 2.875), abs=1e-12)
    # p=0.025: h=0.075 -> 1.0375;  p=0.975: h=2.925 -> 2.5 + 0.925*1.5 = 3.8875
    assert percentile_interval([4, 1, 2.5, 1.5]) == pytest.approx((1.0375, 3.8875), abs=1e-12)


def test_resampled_means_by_hand():
    idx = np.array([[0, 0, 0, 0], [3, 3, 3, 3], [0, 1, 2, 3], [1, 1, 2, 2]])
    assert resampled_means([1, 2, 3, 4], idx).tolist() == [1.0, 4.0, 2.5, 2.5]
    with pytest.raises(SelmaError, match="indices"):
        resampled_means([1, 2], np.array([[0, 2]]))


def test_resample_indices_are_seeded_uniform_draws():
    a, b = resample_indices(5, 1000, seed=3), resample_indices(5, 1000, seed=3)
    assert a.shape == (1000, 5) and np.array_equal(a, b) and a.min() == 0 and a.max() == 4
    assert not np.array_equal(a, resample_indices(5, 1000, seed=4))
    counts = np.bincount(a.ravel(), minlength=5) / a.size
    assert np.allclose(counts, 0.2, atol=0.02)  # 5000 draws: sd of a share ~0.006


def test_bootstrap_of_two_values_covers_both_ends():
    """[0, 1]: the resample means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the central 95%
    interval of their distribution is [0, 1] (both end atoms hold 25% > 2.5%)."""
    est = bootstrap_ci([0.0, 1.0], resamples=4000, seed=0)
    assert (est.mean, est.lo, est.hi, est.n, est.confidence) == (0.5, 0.0, 1.0, 2, 0.95)


def test_bootstrap_ci_is_the_percentile_of_its_own_resamples():
    values = np.array([0.2, 0.5, 0.1, 0.9, 0.4, 0.3])
    est = bootstrap_ci(values, resamples=500, confidence=0.9, seed=11)
    means = resampled_means(values, resample_indices(6, 500, seed=11))
    assert (est.lo, est.hi) == percentile_interval(means, 0.9)
    assert est.mean == pytest.approx(2.4 / 6, abs=1e-15)
    assert bootstrap_ci(values, resamples=500, confidence=0.9, seed=11) == est  # reproducible from its seed


def test_bootstrap_matches_the_normal_interval_for_many_values():
    """n=400 standard-normal draws: the 95% percentile interval ~ mean +- 1.96 s/sqrt(n) (within 10%)."""
    x = np.random.default_rng(0).standard_normal(400)
    est = bootstrap_ci(x, resamples=4000, seed=1)
    half = 1.96 * x.std(ddof=0) / math.sqrt(400)
    assert est.lo < est.mean < est.hi
    assert (est.hi - est.lo) / 2 == pytest.approx(half, rel=0.10)


def test_one_value_and_constant_values_have_a_point_interval():
    assert bootstrap_ci([0.3]) == Estimate(0.3, 0.3, 0.3, 1, 0.95)
    est = bootstrap_ci([0.25] * 7, seed=5)
    assert (est.lo, est.mean, est.hi) == (0.25, 0.25, 0.25)


def test_paired_difference_is_the_bootstrap_of_per_prompt_differences():
    model, base = [3.0, 5.0, 4.0], [1.0, 2.0, 3.0]  # differences 2, 3, 1: mean 2
    d = paired_difference(model, base, resamples=300, seed=7)
    assert d.mean == 2.0 and d == bootstrap_ci([2.0, 3.0, 1.0], resamples=300, seed=7)
    assert 1.0 <= d.lo <= 2.0 <= d.hi <= 3.0
    with pytest.raises(SelmaError, match="same prompts"):
        paired_difference([1.0, 2.0], [1.0])


def test_pairing_removes_between_prompt_spread():
    """Prompts differ a lot, the model adds ~0.1 to each: unpaired intervals overlap, the paired one is clear."""
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 1, 30)
    model = base + 0.1 + rng.normal(0, 0.01, 30)
    a, b = bootstrap_ci(model, seed=0), bootstrap_ci(base, seed=0)
    assert a.lo < b.hi  # the two means' intervals overlap
    d = paired_difference(model, base, seed=0)
    assert verdict(d) == "better" and d.lo > 0.09 and d.hi < 0.11


@pytest.mark.parametrize("lo,hi,want", [(0.01, 0.2, "better"), (-0.2, -0.01, "worse"), (-0.1, 0.1, "unclear"),
                                        (0.0, 0.1, "unclear"), (-0.1, 0.0, "unclear")])
def test_verdict_needs_the_whole_interval_on_one_side(lo, hi, want):
    assert verdict(Estimate((lo + hi) / 2, lo, hi, 10, 0.95)) == want


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [[1.0, 2.0]]])
def test_bad_values_are_errors(bad):
    with pytest.raises(SelmaError):
        bootstrap_ci(bad)


def test_bad_confidence_and_resamples_are_errors():
    with pytest.raises(SelmaError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.0)
    with pytest.raises(SelmaError, match="resamples"):
        bootstrap_ci([1.0, 2.0], resamples=0)


def test_per_prompt_means_and_seed_streams():
    assert per_prompt_means({"a": [0.1, 0.3], "b": [0.5], "c": []}) == {"a": pytest.approx(0.2), "b": 0.5}
    assert derive_seed(0, "clip", "countbench") == derive_seed(0, "clip", "countbench")
    assert len({derive_seed(0, "clip", "a"), derive_seed(0, "clip", "b"), derive_seed(1, "clip", "a"),
                derive_seed(0, "dsg", "a")}) == 4
    assert 0 <= derive_seed(0, "x") < 2**63
    # pinned to its definition (sha256 of the NUL-joined parts, first 8 bytes >> 1): reports stay reproducible
    digest = hashlib.sha256(b"selma-eval-stats\x000\x00clip\x00countbench").digest()
    assert derive_seed(0, "clip", "countbench") == int.from_bytes(digest[:8], "big") >> 1 == 3280232251995985175


def _rec(model, pid, skill, sample, clip, dsg=None, cats=None):
    return {"model": model, "prompt_id": pid, "skill": skill, "sample": sample, "clip": clip, "dsg": dsg,
            "dsg_categories": cats or {}}


def test_summary_by_hand():
    """Two skills; prompt a has two samples (averaged first); the LoRA adds 0.1 CLIP on skill s1."""
    models = [ModelEntry("base", "base", "base"), ModelEntry("x", "x", "expert", skill="s1")]
    recs = [
        _rec("base", "a", "s1", 0, 0.20, 0.5, {"entity": 1.0, "count": 0.0}),
        _rec("base", "a", "s1", 1, 0.30, 1.0, {"entity": 1.0, "count": 1.0}),
        _rec("base", "b", "s1", 0, 0.10, 0.0, {"entity": 0.0}),
        _rec("base", "c", "s2", 0, 0.40, 1.0, {"entity": 1.0}),
        _rec("x", "a", "s1", 0, 0.30, 1.0, {"entity": 1.0, "count": 1.0}),
        _rec("x", "a", "s1", 1, 0.40, 1.0, {"entity": 1.0, "count": 1.0}),
        _rec("x", "b", "s1", 0, 0.20, 0.5, {"entity": 1.0}),
        _rec("x", "c", "s2", 0, 0.40, 1.0, {"entity": 1.0}),
    ]
    s = summarize(recs, models, ["s1", "s2"], EvalConfig(resamples=200))
    assert list(s) == ["clip", "dsg", "dsg.entity", "dsg.count"]
    clip = s["clip"]
    # s1 base: prompt a = (0.2+0.3)/2 = 0.25, prompt b = 0.1 -> 0.175; x: a = 0.35, b = 0.2 -> 0.275
    assert clip["skills"]["s1"]["base"]["mean"] == pytest.approx(0.175)
    assert clip["skills"]["s1"]["base"]["diff"] is None
    x = clip["skills"]["s1"]["x"]
    assert x["mean"] == pytest.approx(0.275) and x["n"] == 2
    assert x["diff"]["mean"] == pytest.approx(0.1) and x["diff"]["lo"] == pytest.approx(0.1)  # both differences 0.1
    assert x["diff"]["verdict"] == "better"
    assert clip["skills"]["s2"]["x"]["diff"]["mean"] == pytest.approx(0.0)
    assert clip["skills"]["s2"]["x"]["diff"]["verdict"] == "unclear"
    # overall pools prompts a, b, c: base (0.25 + 0.1 + 0.4) / 3
    assert clip["overall"]["base"]["mean"] == pytest.approx(0.25)
    # DSG: s1 base a = 0.75, b = 0.0 -> 0.375; count only on prompt a: base 0.5, x 1.0
    assert s["dsg"]["skills"]["s1"]["base"]["mean"] == pytest.approx(0.375)
    assert s["dsg.count"]["skills"]["s1"]["x"]["diff"]["mean"] == pytest.approx(0.5)
    assert s["dsg.count"]["skills"]["s1"]["x"]["n"] == 1 and "s2" not in s["dsg.count"]["skills"]
    table = text_table(s, models)
    assert "s1" in table and "+0.100 [+0.100, +0.100] n=2 better" in table
