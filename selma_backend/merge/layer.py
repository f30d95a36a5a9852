"""One module of a file merge: the merged factors *as stored* and their measured error, computed fast.

Same notation as :mod:`.math`: expert ``i`` is ``(A_i (r_i, in), B_i (out, r_i), alpha_i)``,
``dW_i = (alpha_i / r_i) B_i A_i``; the target of module ``m`` is ``T = b_m * sum_i w_i dW_i`` with ``b_m``
its block weight. :func:`merge_module` returns the factors in the output dtype and

* ``error`` -- ``||dW_stored - T||_F / ||T||_F`` where ``dW_stored`` is what a loader computes from the
  stored (cast) tensors and the stored float32 alpha: the number the issue asks every merge to report;
* ``method_error`` -- the same against the method's own dense result ``M`` (TIES/DARE/pruning change the
  sum on purpose; this says how faithfully the rank-r factors keep ``M``). For linear and svd ``M = T``.

Speed (what the file merge needs for SD-sized layers, 5 experts x rank 128):

* ``linear`` folds one common scale ``c_0 = b w_i alpha_i / r_i`` into alpha and only the *other* experts'
  scales into their ``B`` blocks, so with equal weights and equal ``alpha/r`` (SELMA's default) no tensor is
  rescaled and the error is exactly the float32 rounding of the stored alpha, known without a product
  (``||T||``, which only weighs the module in the overall error, is then estimated from 32 random probes).
* ``svd`` gets the top-``k`` singular subspace from eigendecompositions of small Gram matrices: in factor
  space ``T = U V`` (``U = [c_i B_i]``, ``V = [A_i]``, ``R = sum r_i < min(out, in)``) via the Cholesky factor
  ``G = U^T U = L L^T`` (an eigendecomposition if ``G`` is singular) and ``K = L^T V`` (``R x in``,
  ``K^T K = T^T T``: same right singular vectors and values as ``T``), then ``eigh(K K^T)``; otherwise from
  ``eigh`` of the smaller of ``T T^T`` / ``T^T T``. This runs in float32 first and is kept when the tail
  energy dwarfs float32's rounding (:func:`_tail_ok`), else redone in float64. The result is the float64
  orthogonal projection of ``T`` onto that subspace (Eckart-Young optimal: observed within 1e-12 relative of
  the dense float64 truncated SVD's error), and its error comes from traces,
  ``||S - T||^2 = ||S||^2 - 2 <S, T> + ||T||^2``, at factor cost (relative errors resolved to about 1e-7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import invalid
from .math import (
    MERGE_METHODS,
    Factor,
    _flat_factors,
    _unflatten,
    _weights,
    dare_linear,
    dare_ties,
    magnitude_prune,
    ties,
)

_F64 = torch.float64
_DENSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class LayerResult:
    """Merged factors of one module, in the output dtype, and what they cost in accuracy."""

    down: torch.Tensor  # (rank, in[, kh, kw])
    up: torch.Tensor  # (out, rank[, 1, 1])
    alpha: float  # stored as float32; loaders scale by alpha / rank
    error: float  # vs T = b * sum w_i dW_i
    method_error: float  # vs the method's own dense result
    target_sq: float  # ||T||_F^2, weighs the module in the overall error (linear unrescaled: a 32-probe estimate)
    diff_sq: float  # ||dW_stored - T||_F^2
    method_sq: float  # ||M||_F^2 (M = T for linear and svd)
    method_diff_sq: float  # ||dW_stored - M||_F^2

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def merge_module(
    factors: Sequence[Factor],
    weights: Sequence[float],
    method: str,
    rank: int | None,
    *,
    density: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    scale: float = 1.0,
) -> LayerResult:
    """Merge one module's experts with ``method`` (a ``MERGE_METHODS`` name) and measure the stored result.

    ``rank``: linear ignores it (its rank is ``sum r_i``); svd caps it at ``min(out, in, sum r_i)``; the
    dense methods at ``min(out, in)``; None means that cap. ``scale`` is the block weight ``b_m``.
    ``dtype``: of the stored factors (None: that of ``factors[0]``'s B).
    """
    MERGE_METHODS.get(method)
    flat, kernel = _flat_factors(factors)
    ws0 = _weights(weights, len(flat))
    ws = [w * scale for w in ws0]
    dtype = dtype or flat[0][1].dtype
    out, in_ = flat[0][1].shape[0], flat[0][0].shape[1]
    if method == "linear":
        a, b, alpha, diff_sq, t_sq = _linear(flat, ws, dtype)
        m_sq, m_diff_sq = t_sq, diff_sq
    else:
        u_cat = torch.cat([b.to(_F64) * (w * s) for (_, b, s), w in zip(flat, ws, strict=True)], dim=1)  # (out, R)
        v_cat = torch.cat([a.to(_F64) for a, _, _ in flat], dim=0)  # (R, in)
        if method == "svd":
            cap = min(out, in_, v_cat.shape[0])
            p, q, t_sq = _top_k(u_cat, v_cat, cap if rank is None else min(rank, cap))
            a, b, alpha = q.to(dtype), p.to(dtype), float(p.shape[1])
            diff_sq = _diff_sq_factors(b, a, alpha, u_cat, v_cat, t_sq)
            m_sq, m_diff_sq = t_sq, diff_sq
        else:
            cap = min(out, in_)
            target = u_cat @ v_cat
            deltas = [s * (bb.to(_F64) @ aa.to(_F64)) for aa, bb, s in flat]
            dense = _DENSE_FNS[method](deltas, ws0, density, generator) * scale
            p, q, _ = _top_k_dense(dense, cap if rank is None else min(rank, cap))
            a, b, alpha = q.to(dtype), p.to(dtype), float(p.shape[1])
            stored = (_stored_alpha(alpha) / a.shape[0]) * (b.to(_F64) @ a.to(_F64))
            t_sq = float(target.square().sum())
            diff_sq = float((stored - target).square().sum())
            m_sq, m_diff_sq = float(dense.square().sum()), float((stored - dense).square().sum())
    a, b = _unflatten(a, b, kernel)
    return LayerResult(a.contiguous(), b.contiguous(), alpha, _ratio(diff_sq, t_sq), _ratio(m_diff_sq, m_sq), t_sq,
                       diff_sq, m_sq, m_diff_sq)


def _ratio(num_sq: float, den_sq: float) -> float:
    """``sqrt(num_sq / den_sq)`` with 0/0 -> 0 and x/0 -> inf."""
    if den_sq <= 0.0:
        return 0.0 if num_sq <= 0.0 else math.inf
    return math.sqrt(max(num_sq, 0.0) / den_sq)


def _stored_alpha(alpha: float) -> float:
    """The alpha a loader reads back: the file stores it as a float32 scalar."""
    return float(torch.tensor(alpha, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------- linear


def _linear(flat, ws, dtype):
    """Concatenation with one common scale in alpha; returns (A, B, alpha, ||S - T||^2, ||T||^2)."""
    scales = [w * s for (_, _, s), w in zip(flat, ws, strict=True)]
    c0 = max(set(scales), key=lambda c: (scales.count(c), -scales.index(c)))  # most common, first on ties
    c0 = c0 if c0 != 0.0 else 1.0
    big_r = sum(a.shape[0] for a, _, _ in flat)
    alpha = _stored_alpha(c0 * big_r)
    blocks = [b if c == c0 else (b.to(_F64) * (c / c0)) for (_, b, _), c in zip(flat, scales, strict=True)]
    b_cat = torch.cat([blk.to(dtype) for blk in blocks], dim=1)
    a_cat = torch.cat([a.to(dtype) for a, _, _ in flat], dim=0)
    if all(c == c0 for c in scales) and all(a.dtype == b.dtype == dtype for a, b, _ in flat):
        # S = (alpha / (R c0)) T exactly: the only error is alpha's float32 rounding, known without T. ||T||^2
        # only weighs this layer in the overall error (equal per-layer errors, the usual case, need no weight):
        # a 32-probe sketch E||T w||^2 = ||T||^2 (w Gaussian, fixed seed), spared the out x in x R product.
        rel = abs(alpha / (big_r * c0) - 1.0)
        t_sq = _fro_sq_sketch(b_cat, a_cat) * c0 * c0
        return a_cat, b_cat, alpha, rel * rel * t_sq, t_sq
    work = _F64 if b_cat.shape[0] * a_cat.shape[1] * big_r <= 1 << 24 else torch.float32
    u_cat = torch.cat([b.to(work) * c for (_, b, _), c in zip(flat, scales, strict=True)], dim=1)
    t_sq = _fro_sq(u_cat, a_cat.to(work))
    v64 = torch.cat([a.to(_F64) for a, _, _ in flat], dim=0)
    u64 = torch.cat([b.to(_F64) * c for (_, b, _), c in zip(flat, scales, strict=True)], dim=1)
    if torch.equal(a_cat.to(_F64), v64):  # A stored exactly: S - T = F A with F formed in float64
        f = (alpha / big_r) * b_cat.to(_F64) - u64
        return a_cat, b_cat, alpha, _fro_sq(f.to(work), v64.to(work)), t_sq
    diff = (alpha / big_r) * (b_cat.to(_F64) @ a_cat.to(_F64)) - u64 @ v64
    return a_cat, b_cat, alpha, float(diff.square().sum()), t_sq


def _fro_sq_sketch(p: torch.Tensor, q: torch.Tensor, probes: int = 32) -> float:
    """An unbiased estimate of ``||p @ q||_F^2`` from ``probes`` Gaussian vectors (seed 0), float32."""
    g = torch.Generator().manual_seed(0)
    omega = torch.randn(q.shape[1], probes, generator=g)
    z = p.float() @ (q.float() @ omega)  # (out, probes)
    return float(z.double().square().sum()) / probes


def _fro_sq(p: torch.Tensor, q: torch.Tensor) -> float:
    """``||p @ q||_F^2`` (float64 in), by the cheaper of the dense product and the Gram trace."""
    (out, r), in_ = p.shape, q.shape[1]
    if out * in_ <= (out + in_) * r:
        return float((p @ q).square().sum())
    return float(((p.T @ p) * (q @ q.T)).sum())


# ------------------------------------------------------------------------------------------------- svd


def _top_k(u_cat: torch.Tensor, v_cat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(P (out, k), Q (k, in), ||T||^2)`` with ``P @ Q`` the best rank-k approximation of ``T = u_cat @ v_cat``.

    Tried in float32 first (Gram matrices and ``eigh``), kept when the truncation's tail energy dwarfs
    float32's rounding (:func:`_tail_ok`), else redone in float64. The projection itself is float64.
    """
    return _top_k_in(u_cat, v_cat, k, torch.float32) or _top_k_in(u_cat, v_cat, k, _F64)  # type: ignore[return-value]


def _top_k_in(u64: torch.Tensor, v64: torch.Tensor, k: int, dtype: torch.dtype):
    (out, big_r), in_ = u64.shape, v64.shape[1]
    u, v = u64.to(dtype), v64.to(dtype)
    if big_r >= min(out, in_):  # dense: the smaller Gram of T
        t = u @ v
        m = t @ t.T if out <= in_ else t.T @ t
        kk = None
    else:  # factor space: G = U^T U = L L^T, K = L^T V (R, in), K^T K = T^T T
        low, info = torch.linalg.cholesky_ex(u.T @ u)
        if int(info) != 0:  # rank-deficient U (e.g. an expert's B still zero)
            if dtype != _F64:
                return None
            lam, e = torch.linalg.eigh(u.T @ u)
            kk = (lam.clamp_min(0.0).sqrt()[:, None] * e.T) @ v
        else:
            kk = low.T @ v
        m = kk @ kk.T  # (R, R), eigenvalues sigma_j^2 of T
    lam, w = torch.linalg.eigh(m)
    t_sq = float(torch.diagonal(m).to(_F64).sum())
    if dtype != _F64 and not _tail_ok(lam, t_sq, k, w):
        return None
    wk = w[:, -k:].flip(1).to(_F64)
    if kk is None and out <= in_:
        uk, _ = torch.linalg.qr(wk, mode="reduced")  # (out, k) left singular vectors
        return _balanced(uk, (uk.T @ u64) @ v64) + (t_sq,)
    vk = wk if kk is None else kk.to(_F64).T @ wk  # (in, k): right singular vectors (times sigma)
    vk, _ = torch.linalg.qr(vk, mode="reduced")  # orthonormal: P Q is an orthogonal projection of T
    return _balanced(u64 @ (v64 @ vk), vk.T) + (t_sq,)


#: float32 is kept when the energy outside the top k is at least this many times k * eps32 * lambda_max.
_F32_MARGIN = 1e5


def _tail_ok(lam: torch.Tensor, total: float, k: int, vectors: torch.Tensor) -> bool:
    """Is a float32 eigendecomposition good enough to pick the top-``k`` subspace?

    float32 ``eigh`` (and Gram matrices formed in float32) give the exact eigenvectors of a matrix perturbed
    by ``E`` with ``||E||`` ~ eps32 ``lambda_max``. The energy the chosen subspace misses beyond the optimum is
    at most ``2 k ||E||`` (Weyl) and in practice second order (observed ~1e-12 relative on SD-shaped merges),
    so next to a tail ``sum_{j > k} lambda_j`` of ``_F32_MARGIN * k * eps32 * lambda_max`` or more the result
    is optimal to far better than 1e-5; a nearly exact truncation (small tail) is redone in float64.
    """
    lam_max = max(float(lam[-1]), 0.0)
    tail = total - float(lam[-k:].to(_F64).sum())
    return tail >= _F32_MARGIN * k * torch.finfo(torch.float32).eps * lam_max and bool(torch.isfinite(vectors).all())


def _top_k_dense(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k approximation of a dense float64 ``t (out, in)`` from the smaller Gram's top eigenvectors."""
    out, in_ = t.shape
    t_sq = float(t.square().sum())
    if out <= in_:
        uk, _ = torch.linalg.qr(_top_eigvecs(t @ t.T, k), mode="reduced")  # (out, k)
        return _balanced(uk, uk.T @ t) + (t_sq,)
    vk, _ = torch.linalg.qr(_top_eigvecs(t.T @ t, k), mode="reduced")  # (in, k)
    return _balanced(t @ vk, vk.T) + (t_sq,)


def _top_eigvecs(m: torch.Tensor, k: int) -> torch.Tensor:
    """Eigenvectors of the ``k`` largest eigenvalues of a symmetric PSD float64 ``m``, as float64 ``(n, k)``
    (float32 ``eigh`` when :func:`_tail_ok`, else float64)."""
    lam, w = torch.linalg.eigh(m.float())
    if _tail_ok(lam, float(m.trace()), k, w):
        return w[:, -k:].flip(1).to(_F64)
    return torch.linalg.eigh(m)[1][:, -k:].flip(1)


def _balanced(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-1 term ``p_j q_j`` so both factors carry ``sqrt(sigma_j)`` (product unchanged)."""
    n_p, n_q = p.norm(dim=0), q.norm(dim=1)
    ok = (n_p > 0) & (n_q > 0)
    f = torch.where(ok, (n_q / n_p.where(ok, 1.0)).sqrt(), 0.0)
    g = torch.where(ok, (n_p / n_q.where(ok, 1.0)).sqrt(), 0.0)
    return p * f, q * g[:, None]


def _diff_sq_factors(b: torch.Tensor, a: torch.Tensor, alpha: float, u_cat: torch.Tensor, v_cat: torch.Tensor,
                     t_sq: float) -> float:
    """``||(alpha'/k) B A - U V||_F^2`` from traces (never forming an ``out x in`` matrix)."""
    s = _stored_alpha(alpha) / a.shape[0]
    b64, a64 = b.to(_F64) * s, a.to(_F64)
    s_sq = float(((b64.T @ b64) * (a64 @ a64.T)).sum())
    cross = float(((b64.T @ u_cat) * (a64 @ v_cat.T)).sum())  # <B A, U V> = tr((B^T U)(V A^T))
    return max(s_sq - 2.0 * cross + t_sq, 0.0)


_DENSE_FNS: dict[str, Callable[..., torch.Tensor]] = {  # name -> fn(deltas, weights, density, generator)
    "ties": lambda d, w, density, g: ties(d, w, density),
    "magnitude_prune": lambda d, w, density, g: magnitude_prune(d, w, density),
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
}
if set(_DENSE_FNS) | {"linear", "svd"} != set(MERGE_METHODS.names()):  # pragma: no cover - registry drift
    raise invalid("MERGE_METHODS", MERGE_METHODS.names(), sorted(_DENSE_FNS) + ["linear", "svd"],
                  "every registered method needs its dense function here")
