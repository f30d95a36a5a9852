"""Statistics for stage 6: means, percentile-bootstrap confidence intervals, paired differences.

Pure functions on 1-D arrays of per-prompt scores (numpy only, no torch). The unit of resampling is
the prompt: when a prompt has several images (samples), its score is their mean first
(:func:`per_prompt_means`), so images of one prompt never count as independent evidence.

Percentile bootstrap (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13):
draw ``B`` resamples of the ``n`` prompt indices with replacement, take the mean of each, and report
the ``(1 - c) / 2`` and ``(1 + c) / 2`` quantiles of those ``B`` means (numpy's default "linear"
quantile, Hyndman & Fan type 7). Paired difference of a model against the base: the same resample
of prompt indices is applied to both, which is the bootstrap of the per-prompt differences
``d_i = model_i - base_i``. A difference whose whole interval lies above 0 is "better", below 0
"worse", otherwise "unclear" (:func:`verdict`).

Resamples are drawn from ``numpy.random.default_rng(seed)`` (PCG64), so a report is reproducible
bit for bit from its seed; :func:`derive_seed` gives each (metric, skill) its own stream, and every
model within one (metric, skill) sees the same resamples (common random numbers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import invalid

VERDICTS = ("better", "worse", "unclear")


@dataclass(frozen=True)
class Estimate:
    """A mean with its confidence interval over ``n`` prompts (``lo == hi == mean`` when n == 1)."""

    mean: float
    lo: float
    hi: float
    n: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _vector(values: Sequence[float] | np.ndarray, field: str = "values") -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise invalid(field, f"shape {arr.shape}", "a non-empty 1-D sequence of numbers")
    if not np.all(np.isfinite(arr)):
        raise invalid(field, "a NaN or infinite value", "finite numbers", "drop missing scores before the statistics")
    return arr


def _check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise invalid("confidence", confidence, "a number strictly between 0 and 1", "0.95 for a 95% interval")
    return float(confidence)


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) int64 indices drawn uniformly from ``0..n-1`` with replacement, seeded."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise invalid("resamples", resamples, "an integer >= 1", "2000 is typical")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def resampled_means(values: Sequence[float] | np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Mean of each resample: ``values`` (n,), ``indices`` (B, n) -> (B,)."""
    arr = _vector(values)
    idx = np.asarray(indices)
    if idx.ndim != 2 or (idx.size and (idx.min() < 0 or idx.max() >= arr.size)):
        raise invalid("indices", f"shape {idx.shape}", f"a (B, n) array of indices into {arr.size} values")
    return arr[idx].mean(axis=1)


def percentile_interval(samples: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` interval of ``samples``: quantiles (1-c)/2 and (1+c)/2 (type 7)."""
    c = _check_confidence(confidence)
    arr = _vector(samples, "samples")
    lo, hi = np.quantile(arr, [(1 - c) / 2, (1 + c) / 2])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> Estimate:
    """Mean of ``values`` and its percentile-bootstrap interval (see the module doc)."""
    arr = _vector(values)
    c = _check_confidence(confidence)
    mean = float(arr.mean())
    if arr.size == 1:  # one prompt: nothing to resample, the interval is the point
        return Estimate(mean, mean, mean, 1, c)
    lo, hi = percentile_interval(resampled_means(arr, resample_indices(arr.size, resamples, seed)), c)
    return Estimate(mean, lo, hi, int(arr.size), c)


def paired_difference(values: Sequence[float] | np.ndarray, base: Sequence[float] | np.ndarray, *,
                      resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of ``values - base`` (paired by position: the same prompt) and its bootstrap interval."""
    a, b = _vector(values), _vector(base, "base")
    if a.shape != b.shape:
        raise invalid("base", f"{b.size} values", f"one per value ({a.size}), the same prompts in the same order")
    return bootstrap_ci(a - b, resamples=resamples, confidence=confidence, seed=seed)


def verdict(diff: Estimate) -> str:
    """"better" when the whole interval of a difference is above 0, "worse" when below, else "unclear"."""
    if diff.lo > 0:
        return "better"
    if diff.hi < 0:
        return "worse"
    return "unclear"


def per_prompt_means(scores: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """prompt id -> mean of that prompt's image scores (prompts with no score are left out)."""
    return {pid: float(np.mean(v)) for pid, v in scores.items() if len(v)}


def derive_seed(seed: int, *parts: str) -> int:
    """A 63-bit seed for one (metric, skill) stream: stable across runs, processes and platforms."""
    text = "\0".join(["selma-eval-stats", str(seed), *parts])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1
