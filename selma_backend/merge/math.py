"""Pure math of SELMA's LoRA merge (S5): tensors in, tensors out, no I/O.

Notation for one layer and N experts. Expert ``i`` is a triple ``(A_i, B_i, alpha_i)``:

* ``A_i`` -- LoRA *down* factor, shape ``(r_i, in)``
* ``B_i`` -- LoRA *up* factor, shape ``(out, r_i)``
* ``alpha_i`` -- scalar (``None`` means ``alpha_i = r_i``, i.e. scale 1)

and ``dW_i = (alpha_i / r_i) * B_i @ A_i`` with shape ``(out, in)``. The merge target is
``T = sum_i w_i * dW_i``, with default weights ``w_i = 1 / N``.

Conv LoRA: a 4-D down factor ``(r, in, kh, kw)`` with up factor ``(out, r, 1, 1)`` is flattened to
``(r, in*kh*kw)`` / ``(out, r)``; results are reshaped back to ``(rank, in, kh, kw)`` /
``(out, rank, 1, 1)``. Dense ``dW`` / targets are always 2-D ``(out, in*kh*kw)``.

Precision: the SVD paths and :func:`relative_error` compute in float64 and return factors in the dtype of
the first expert's ``A``. :func:`linear_merge` stays in the input dtype (only the scalar scales are float64).

Style after peft's ``peft/utils/merge_utils.py`` (small pure functions, documented shapes); the
task-arithmetic methods (TIES, DARE, magnitude pruning) follow the same published recipes peft
implements there, re-written here with SELMA's validation, weighted sign election and weighted disjoint mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..errors import invalid
from ..registry import Registry

Factor = tuple[torch.Tensor, torch.Tensor, float | None]
Weights = Sequence[float] | torch.Tensor | None

_F64 = torch.float64


# ----------------------------------------------------------------------------------------------- validation


def _flat_factors(factors: Sequence[Factor]) -> tuple[list[tuple[torch.Tensor, torch.Tensor, float]], tuple | None]:
    """Validate experts and return 2-D ``(A, B, scale)`` triples plus the conv kernel shape (or None).

    ``scale = alpha / r``. All experts must share ``out``, ``in`` (and kernel size for conv).
    """
    if not isinstance(factors, (list, tuple)) or len(factors) == 0:
        raise invalid("factors", type(factors).__name__, "a non-empty list of (A, B, alpha) tuples")
    out_in: tuple[int, int] | None = None
    kernel: tuple | None = None
    flat = []
    for i, item in enumerate(factors):
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise invalid(f"factors[{i}]", type(item).__name__, "a tuple (A, B, alpha)")
        a, b, alpha = item
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise invalid(f"factors[{i}]", (type(a).__name__, type(b).__name__), "torch.Tensor A and B")
        if a.dim() == 4 and b.dim() == 4:
            if tuple(b.shape[2:]) != (1, 1):
                raise invalid(f"factors[{i}].B", tuple(b.shape), "conv up factor of shape (out, r, 1, 1)")
            k = tuple(a.shape[2:])
            if kernel is None and i == 0:
                kernel = k
            if kernel != k:
                raise invalid(f"factors[{i}].A", tuple(a.shape), f"kernel size {kernel} like factors[0]")
            a = a.reshape(a.shape[0], -1)
            b = b.reshape(b.shape[0], b.shape[1])
        elif a.dim() != 2 or b.dim() != 2:
            raise invalid(
                f"factors[{i}]",
                (tuple(a.shape), tuple(b.shape)),
                "A (r, in) and B (out, r) both 2-D, or both 4-D conv factors",
            )
        elif kernel is not None:
            raise invalid(f"factors[{i}].A", tuple(a.shape), f"4-D conv factors like factors[0] (kernel {kernel})")
        r = a.shape[0]
        if r < 1 or b.shape[1] != r:
            raise invalid(f"factors[{i}].B", tuple(b.shape), f"shape (out, {r}) matching A's rank {r}")
        if out_in is None:
            out_in = (b.shape[0], a.shape[1])
        elif (b.shape[0], a.shape[1]) != out_in:
            raise invalid(f"factors[{i}]", (b.shape[0], a.shape[1]), f"(out, in) = {out_in} like factors[0]")
        if alpha is None:
            alpha = float(r)
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.item())
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise invalid(f"factors[{i}].alpha", alpha, "a finite number or None (= rank)")
        flat.append((a, b, float(alpha) / r))
    return flat, kernel


def _weights(weights: Weights, n: int) -> list[float]:
    """Validate weights; ``None`` → ``[1/n] * n``."""
    if weights is None:
        return [1.0 / n] * n
    if isinstance(weights, torch.Tensor):
        weights = weights.reshape(-1).tolist()
    try:
        ws = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise invalid("weights", weights, f"None or {n} finite numbers") from None
    if len(ws) != n or not all(math.isfinite(w) for w in ws):
        raise invalid("weights", weights, f"None or {n} finite numbers (one per expert)")
    return ws


def _density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0.0 < density <= 1.0):
        raise invalid("density", density, "a number in (0, 1]", "1 keeps every entry")
    return float(density)


def _deltas(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Validate a list of same-shaped dense deltas and stack them: ``(N, *shape)``."""
    if not isinstance(deltas, (list, tuple)) or len(deltas) == 0:
        raise invalid("deltas", type(deltas).__name__, "a non-empty list of tensors of one shape")
    shape = None
    for i, d in enumerate(deltas):
        if not isinstance(d, torch.Tensor):
            raise invalid(f"deltas[{i}]", type(d).__name__, "a torch.Tensor")
        if shape is None:
            shape = d.shape
        elif d.shape != shape:
            raise invalid(f"deltas[{i}]", tuple(d.shape), f"shape {tuple(shape)} like deltas[0]")
    return torch.stack(list(deltas), dim=0)


def _unflatten(a: torch.Tensor, b: torch.Tensor, kernel: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    if kernel is None:
        return a, b
    return a.reshape(a.shape[0], -1, *kernel), b.reshape(b.shape[0], b.shape[1], 1, 1)


def _check_rank(rank: object, field: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise invalid(field, rank, "an integer >= 1")
    return rank


# ------------------------------------------------------------------------------------------------ exact math


def delta_weight(a: torch.Tensor, b: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """``(alpha / r) * B @ A`` in float64: A ``(r, in)`` or ``(r, in, kh, kw)``, B ``(out, r[, 1, 1])`` → ``(out, in*kh*kw)``."""
    (flat,), _ = _flat_factors([(a, b, alpha)])
    fa, fb, s = flat
    return s * (fb.to(_F64) @ fa.to(_F64))


def _target(flat: list, ws: list[float]) -> torch.Tensor:
    """Dense ``sum_i w_i * s_i * B_i @ A_i`` in float64, shape ``(out, in)``."""
    return sum(w * s * (b.to(_F64) @ a.to(_F64)) for (a, b, s), w in zip(flat, ws, strict=True))


def linear_merge(factors: Sequence[Factor], weights: Weights = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact merge by concatenation.

    Returns ``A_cat (R, in)``, ``B_cat (out, R)``, ``alpha_out = R`` with ``R = sum_i r_i`` so that
    ``(alpha_out / R) * B_cat @ A_cat == sum_i w_i * dW_i``. ``alpha_out = R`` makes the LoRA scale 1, and
    each expert's scale ``w_i * alpha_i / r_i`` is folded into its block of ``B`` (not split as a square root
    between A and B, so negative weights need no special case). ``A_cat`` is the rows ``A_i`` stacked.
    Result dtype: that of the inputs (each block keeps its own dtype; mixed dtypes follow torch.cat promotion).
    """
    flat, kernel = _flat_factors(factors)
    ws = _weights(weights, len(flat))
    a_cat = torch.cat([a for a, _, _ in flat], dim=0)
    b_cat = torch.cat([b * (w * s) for (_, b, s), w in zip(flat, ws, strict=True)], dim=1)
    a_cat, b_cat = _unflatten(a_cat, b_cat, kernel)
    return a_cat, b_cat, float(a_cat.shape[0])


# ---------------------------------------------------------------------------------------------------- SVD


def _use_factor_space(method: str, big_r: int, out: int, in_: int) -> bool:
    if method == "auto":
        return big_r < min(out, in_)
    if method in ("factor", "dense"):
        return method == "factor"
    raise invalid(
        "method", method, ["auto", "factor", "dense"], "'auto' uses factor space when sum(r_i) < min(out, in)"
    )


def _svd(flat: list, ws: list[float], method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the float64 target: ``U (out, m)``, ``S (m,)`` descending, ``Vh (m, in)``.

    Factor space: U_cat = [w_1 s_1 B_1 ... w_N s_N B_N] (out, R), V_cat = [A_1; ...; A_N] (R, in), so
    T = U_cat @ V_cat. With U_cat = Qu Ru and V_cat^T = Qv Rv (reduced QR), T = Qu (Ru Rv^T) Qv^T and only the
    small core Ru Rv^T (at most R x R) needs an SVD: O((out + in) R^2) instead of O(out * in * min(out, in)).
    """
    out, in_ = flat[0][1].shape[0], flat[0][0].shape[1]
    big_r = sum(a.shape[0] for a, _, _ in flat)
    if _use_factor_space(method, big_r, out, in_):
        u_cat = torch.cat([b.to(_F64) * (w * s) for (_, b, s), w in zip(flat, ws, strict=True)], dim=1)
        v_cat = torch.cat([a.to(_F64) for a, _, _ in flat], dim=0)
        qu, ru = torch.linalg.qr(u_cat, mode="reduced")
        qv, rv = torch.linalg.qr(v_cat.T, mode="reduced")
        p, sv, qh = torch.linalg.svd(ru @ rv.T, full_matrices=False)
        return qu @ p, sv, qh @ qv.T
    return torch.linalg.svd(_target(flat, ws), full_matrices=False)


def merged_singular_values(factors: Sequence[Factor], weights: Weights = None, *, method: str = "auto") -> torch.Tensor:
    """Singular values (float64, descending) of ``T = sum_i w_i dW_i``; zeros beyond the factor rank omitted."""
    flat, _ = _flat_factors(factors)
    return _svd(flat, _weights(weights, len(flat)), method)[1]


def svd_merge(
    factors: Sequence[Factor], weights: Weights = None, rank: int = 1, *, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` approximation of ``T = sum_i w_i dW_i`` in Frobenius norm (Eckart–Young).

    Returns ``A (rank, in)``, ``B (out, rank)``, ``alpha = rank`` (scale 1), ``B @ A ≈ T``. The singular
    values are split as ``sqrt(S)`` into both factors (balanced norms). Computed in float64, returned in the
    dtype of ``factors[0]``'s A. If ``rank`` exceeds the rank available (``min(out, in, sum r_i)``) the extra
    rows/columns are zero, so the output always has exactly ``rank``.
    ``method``: ``"factor"`` (QR + small-core SVD), ``"dense"`` (SVD of the formed T) or ``"auto"``
    (factor space when ``sum r_i < min(out, in)``).
    """
    rank = _check_rank(rank)
    flat, kernel = _flat_factors(factors)
    ws = _weights(weights, len(flat))
    u, sv, vh = _svd(flat, ws, method)
    k = min(rank, sv.shape[0])
    root = sv[:k].sqrt()
    b = u[:, :k] * root
    a = root[:, None] * vh[:k]
    if k < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    dtype = flat[0][0].dtype
    a, b = _unflatten(a.to(dtype), b.to(dtype), kernel)
    return a, b, float(rank)


def _rank_for_budget(sv: torch.Tensor, budget: float, max_rank: int | None) -> int:
    """Smallest k >= 1 with ``sqrt(sum_{j>=k} s_j^2) / sqrt(sum s_j^2) <= budget`` (capped at max_rank)."""
    energy = (sv.to(_F64) ** 2).flip(0).cumsum(0).flip(0)  # tail[k] = sum_{j>=k} s_j^2
    total = float(energy[0]) if energy.numel() else 0.0
    cap = sv.shape[0] if max_rank is None else max_rank
    if total == 0.0:
        return 1
    for k in range(1, max(1, cap) + 1):
        tail = float(energy[k]) if k < energy.shape[0] else 0.0
        if math.sqrt(tail / total) <= budget:
            return k
    return max(1, cap)


def auto_rank(
    factors: Sequence[Factor],
    weights: Weights = None,
    budget: float = 0.05,
    *,
    max_rank: int | None = None,
    method: str = "auto",
) -> int:
    """Smallest rank whose best approximation has relative Frobenius error ``<= budget``.

    The error of the rank-k truncation is ``sqrt(sum_{j>k} s_j^2 / sum_j s_j^2)`` (s = singular values of T).
    Always >= 1 (a zero target gives 1); if ``max_rank`` is given and cannot meet the budget, returns ``max_rank``.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (0.0 <= budget < 1.0):
        raise invalid("budget", budget, "a relative error in [0, 1)", "e.g. 0.05 keeps 95% of the Frobenius norm")
    if max_rank is not None:
        _check_rank(max_rank, "max_rank")
    return _rank_for_budget(merged_singular_values(factors, weights, method=method), float(budget), max_rank)


def relative_error(a: torch.Tensor, b: torch.Tensor, alpha: float | None, target: torch.Tensor) -> float:
    """``||(alpha / r) B A - target||_F / ||target||_F`` in float64 (0/0 → 0, x/0 → inf).

    A ``(r, in[, kh, kw])``, B ``(out, r[, 1, 1])``, target ``(out, in*kh*kw)`` (any shape with that many entries).
    """
    dw = delta_weight(a, b, alpha)
    if not isinstance(target, torch.Tensor) or target.numel() != dw.numel():
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise invalid("target", shape, f"a tensor with shape {tuple(dw.shape)}")
    t = target.reshape(dw.shape).to(_F64)
    num = float(torch.linalg.norm(dw - t))
    den = float(torch.linalg.norm(t))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


# ---------------------------------------------------------------------------------------- task arithmetic
# Dense methods: deltas are N tensors of one shape (out, in); weights as above. Result has the same shape.
# Recipes as in peft's merge_utils (TIES: Yadav et al. 2023; DARE: Yu et al. 2023).


def _trim_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density * numel)`` largest-|x| entries of ``t``, zero the rest (ties: topk order)."""
    if density >= 1.0:
        return t
    k = int(round(density * t.numel()))
    flat = t.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat.abs(), k).indices] = True
    return (flat * mask).reshape(t.shape)


def _drop_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry iff ``rand < density`` (one ``torch.rand`` draw of t's shape), rescale by 1/density."""
    if density >= 1.0:
        return t
    keep = torch.rand(t.shape, generator=generator, dtype=_F64, device=t.device) < density
    return t * keep / density


def _weighted_stack(stacked: torch.Tensor, ws: list[float]) -> torch.Tensor:
    w = torch.tensor(ws, dtype=stacked.dtype, device=stacked.device)
    return stacked * w.reshape(-1, *([1] * (stacked.dim() - 1)))


def _elect_and_merge(weighted: torch.Tensor, ws: list[float]) -> torch.Tensor:
    """TIES sign election + disjoint mean over ``weighted (N, ...)`` = w_i * tau_i (already trimmed).

    Elected sign per entry: sign of ``sum_i w_i tau_i`` (= positive mass minus negative mass; ties → +).
    Merged entry: ``sum_{i agrees} w_i tau_i / sum_{i agrees} |w_i|`` — the weighted mean over the experts whose
    (non-zero) value agrees with the elected sign; 0 where none agrees. With equal weights this is the
    plain disjoint mean of TIES.
    """
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    agree = (weighted.sign() == elected) & (weighted != 0)
    w_abs = torch.tensor([abs(w) for w in ws], dtype=weighted.dtype, device=weighted.device)
    w_abs = w_abs.reshape(-1, *([1] * (weighted.dim() - 1)))
    num = (weighted * agree).sum(dim=0)
    den = (w_abs * agree).sum(dim=0)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(weighted.dtype).tiny), torch.zeros_like(num))


def magnitude_prune(deltas: Sequence[torch.Tensor], weights: Weights = None, density: float = 0.5) -> torch.Tensor:
    """Trim each delta to its top-``density`` magnitudes, then ``sum_i w_i * trim(delta_i)``."""
    stacked = _deltas(deltas)
    ws, density = _weights(weights, stacked.shape[0]), _density(density)
    trimmed = torch.stack([_trim_magnitude(d, density) for d in stacked])
    return _weighted_stack(trimmed, ws).sum(dim=0)


def ties(deltas: Sequence[torch.Tensor], weights: Weights = None, density: float = 0.5) -> torch.Tensor:
    """TIES: trim each delta to top-``density`` magnitudes, elect sign, weighted disjoint mean."""
    stacked = _deltas(deltas)
    ws, density = _weights(weights, stacked.shape[0]), _density(density)
    trimmed = torch.stack([_trim_magnitude(d, density) for d in stacked])
    return _elect_and_merge(_weighted_stack(trimmed, ws), ws)


def dare_linear(
    deltas: Sequence[torch.Tensor],
    weights: Weights = None,
    density: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: drop each entry with probability ``1 - density`` and rescale by ``1/density``; then weighted sum.

    Randomness: one ``torch.rand(delta.shape, generator=generator, dtype=float64)`` per delta, in order.
    """
    stacked = _deltas(deltas)
    ws, density = _weights(weights, stacked.shape[0]), _density(density)
    dropped = torch.stack([_drop_random(d, density, generator) for d in stacked])
    return _weighted_stack(dropped, ws).sum(dim=0)


def dare_ties(
    deltas: Sequence[torch.Tensor],
    weights: Weights = None,
    density: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE drop-and-rescale (as :func:`dare_linear`), then TIES sign election and weighted disjoint mean."""
    stacked = _deltas(deltas)
    ws, density = _weights(weights, stacked.shape[0]), _density(density)
    dropped = torch.stack([_drop_random(d, density, generator) for d in stacked])
    return _elect_and_merge(_weighted_stack(dropped, ws), ws)


# ---------------------------------------------------------------------------------------------- per layer

MergeFn = Callable[..., tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]]
MERGE_METHODS: Registry[MergeFn] = Registry("method")


def _dense_method(fn: Callable[..., torch.Tensor], random: bool) -> MergeFn:
    def run(factors, weights, rank, density, generator):
        flat, kernel = _flat_factors(factors)
        ws = _weights(weights, len(flat))
        deltas = [s * (b.to(_F64) @ a.to(_F64)) for a, b, s in flat]
        merged = fn(deltas, ws, density, generator) if random else fn(deltas, ws, density)
        return (*_compress(merged, rank, flat[0][0].dtype, kernel), merged)

    return run


def _compress(dense: torch.Tensor, rank: int | None, dtype: torch.dtype, kernel: tuple | None):
    """Truncated SVD of a dense float64 ``(out, in)`` matrix → ``(A, B, alpha=rank)`` (sqrt(S) split)."""
    out, in_ = dense.shape
    rank = min(out, in_) if rank is None else rank
    fa = dense.new_zeros(rank, in_)
    fb = dense.new_zeros(out, rank)
    u, sv, vh = torch.linalg.svd(dense, full_matrices=False)
    k = min(rank, sv.shape[0])
    root = sv[:k].sqrt()
    fb[:, :k] = u[:, :k] * root
    fa[:k] = root[:, None] * vh[:k]
    a, b = _unflatten(fa.to(dtype), fb.to(dtype), kernel)
    return a, b, float(rank)


def _linear(factors, weights, rank, density, generator):
    flat, _ = _flat_factors(factors)
    return (*linear_merge(factors, weights), _target(flat, _weights(weights, len(flat))))


def _svd_method(factors, weights, rank, density, generator):
    flat, _ = _flat_factors(factors)
    ws = _weights(weights, len(flat))
    if rank is None:
        rank = min(flat[0][1].shape[0], flat[0][0].shape[1], sum(a.shape[0] for a, _, _ in flat))
    return (*svd_merge(factors, ws, rank), _target(flat, ws))


MERGE_METHODS.add("linear", _linear)
MERGE_METHODS.add("svd", _svd_method)
MERGE_METHODS.add("ties", _dense_method(ties, random=False))
MERGE_METHODS.add("dare_linear", _dense_method(dare_linear, random=True))
MERGE_METHODS.add("dare_ties", _dense_method(dare_ties, random=True))
MERGE_METHODS.add("magnitude_prune", _dense_method(magnitude_prune, random=False))


def merge_layer(
    factors: Sequence[Factor],
    weights: Weights = None,
    method: str = "svd",
    rank: int | None = None,
    density: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Merge one layer's experts with ``MERGE_METHODS[method]``; returns ``(A, B, alpha, rel_error)``.

    * ``linear`` — exact concatenation (:func:`linear_merge`); ``rank`` is ignored (result rank = sum r_i).
    * ``svd`` — :func:`svd_merge` to ``rank`` (None → the full available rank, i.e. exact up to roundoff).
    * ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune`` — the dense method on
      ``dW_i = (alpha_i/r_i) B_i A_i`` (float64), then truncated SVD to ``rank`` (None → min(out, in)).

    ``rel_error`` is the compression error against the method's own dense result (for linear/svd that is
    ``sum_i w_i dW_i``); it says how faithfully the returned factors store what the method produced.
    ``density`` is used by the task-arithmetic methods (in (0, 1]); ``generator`` by the DARE methods.
    """
    fn = MERGE_METHODS.get(method)
    if rank is not None:
        _check_rank(rank)
    _density(density)
    a, b, alpha, target = fn(factors, weights, rank, density, generator)
    return a, b, alpha, relative_error(a, b, alpha, target)
