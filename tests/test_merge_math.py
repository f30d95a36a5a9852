"""S5 merge math: exactness, Eckart–Young optimality, task-arithmetic vs loop references, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selma_backend.errors import SelmaError
from selma_backend.merge import (
    MERGE_METHODS,
    auto_rank,
    dare_linear,
    dare_ties,
    linear_merge,
    magnitude_prune,
    merge_layer,
    merged_singular_values,
    relative_error,
    svd_merge,
    ties,
)


def _experts(ranks=(2, 3, 5), alphas=(1.0, 4.0, 7.5), out=24, inn=20, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(r, inn, generator=g, dtype=dtype), torch.randn(out, r, generator=g, dtype=dtype), a)
        for r, a in zip(ranks, alphas, strict=True)
    ]


def _dense_target(factors, weights):
    return sum(
        w * (al / a.shape[0]) * (b.double() @ a.double()) for (a, b, al), w in zip(factors, weights, strict=True)
    )


def _fro_rel(x, t):
    return float(torch.linalg.norm(x - t) / torch.linalg.norm(t))


# ------------------------------------------------------------------------------------------------ linear


def test_linear_is_exact_stacking_float64():
    f = _experts()
    w = [0.5, -1.25, 2.0]
    a, b, alpha = linear_merge(f, w)
    assert a.shape == (10, 20) and b.shape == (24, 10) and alpha == 10.0
    assert a.dtype == torch.float64
    got = (alpha / a.shape[0]) * b @ a
    assert _fro_rel(got, _dense_target(f, w)) <= 1e-12  # tol 1e-12 relative


def test_linear_default_weights_and_alpha_none():
    f = _experts(ranks=(2, 4), alphas=(None, 8.0))
    a, b, alpha = linear_merge(f)
    ref = _dense_target([(f[0][0], f[0][1], 2.0), f[1]], [0.5, 0.5])
    assert _fro_rel((alpha / a.shape[0]) * b @ a, ref) <= 1e-12  # tol 1e-12 relative
    assert relative_error(a, b, alpha, ref) <= 1e-12  # tol 1e-12


def test_linear_conv_4d_roundtrip():
    g = torch.Generator().manual_seed(3)
    f = [
        (
            torch.randn(r, 6, 3, 3, generator=g, dtype=torch.float64),
            torch.randn(8, r, 1, 1, generator=g, dtype=torch.float64),
            2.0,
        )
        for r in (2, 3)
    ]
    a, b, alpha = linear_merge(f, [1.0, 1.0])
    assert a.shape == (5, 6, 3, 3) and b.shape == (8, 5, 1, 1)
    ref = _dense_target([(x.reshape(x.shape[0], -1), y.reshape(8, -1), al) for x, y, al in f], [1.0, 1.0])
    assert relative_error(a, b, alpha, ref) <= 1e-12  # tol 1e-12


# -------------------------------------------------------------------------------------------------- svd


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_svd_factor_space_matches_dense_optimum(rank):
    f = _experts(out=40, inn=30)  # R = 10 < min(out, in) → auto uses factor space
    w = [0.3, 0.5, -0.7]
    t = _dense_target(f, w)
    u, s, vh = torch.linalg.svd(t)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    opt_err = float(torch.linalg.norm(t - best) / torch.linalg.norm(t))
    assert abs(opt_err - float((s[rank:] ** 2).sum().sqrt() / torch.linalg.norm(t))) <= 1e-12  # Eckart–Young, 1e-12
    results = {}
    for m in ("auto", "factor", "dense"):
        a, b, alpha = svd_merge(f, w, rank, method=m)
        assert a.shape == (rank, 30) and b.shape == (40, rank) and alpha == float(rank)
        err = relative_error(a, b, alpha, t)
        assert abs(err - opt_err) <= 1e-5 * max(opt_err, 1e-12)  # tol 1e-5 relative on the Frobenius error
        approx = (alpha / rank) * b @ a
        assert _fro_rel(approx, best) <= 1e-5  # tol 1e-5: same matrix as the dense truncated SVD
        results[m] = approx
    assert _fro_rel(results["factor"], results["dense"]) <= 1e-5  # tol 1e-5: both paths agree


def test_svd_dtype_and_rank_padding():
    f = _experts(ranks=(1, 2), alphas=(1.0, 2.0), out=6, inn=5, dtype=torch.float32)
    a, b, alpha = svd_merge(f, None, 5)
    assert a.dtype == torch.float32 and a.shape == (5, 5) and b.shape == (6, 5) and alpha == 5.0
    assert torch.count_nonzero(a[3:]) == 0  # only rank 3 is available; rest is zero padding
    t = _dense_target(f, [0.5, 0.5])
    assert relative_error(a, b, alpha, t) <= 1e-5  # tol 1e-5 (float32 output)


def test_merged_singular_values_paths_agree():
    f = _experts(out=40, inn=30)
    s_f = merged_singular_values(f, method="factor")
    s_d = merged_singular_values(f, method="dense")[: s_f.shape[0]]
    assert torch.allclose(s_f, s_d, rtol=1e-9, atol=1e-9 * float(s_d[0]))  # tol 1e-9


def test_auto_rank_smallest_under_budget():
    f = _experts(out=40, inn=30)
    w = [1.0, 1.0, 1.0]
    s = torch.linalg.svdvals(_dense_target(f, w))
    tot = float((s**2).sum())
    errs = [float((s[k:] ** 2).sum() / tot) ** 0.5 for k in range(s.shape[0] + 1)]
    for budget in (0.0 + 1e-9, 0.05, 0.2, 0.5, 0.9):
        k = auto_rank(f, w, budget)
        assert errs[k] <= budget + 1e-12  # tol 1e-12
        assert k == 1 or errs[k - 1] > budget
    assert auto_rank(f, w, 0.05, max_rank=2) <= 2


# --------------------------------------------------------------------------------------- task arithmetic
# Independent references: numpy + plain Python loops over entries.


def _np_trim(d, density):
    flat = [(abs(v), i) for i, v in enumerate(d.ravel())]
    k = int(round(density * len(flat)))
    keep = {i for _, i in sorted(flat, reverse=True)[:k]}
    out = np.zeros(d.size)
    for i, v in enumerate(d.ravel()):
        if i in keep:
            out[i] = v
    return out.reshape(d.shape)


def _np_ties_merge(ds, ws):
    res = np.zeros(ds[0].shape)
    for idx in np.ndindex(res.shape):
        vals = [w * d[idx] for d, w in zip(ds, ws, strict=True)]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        num = den = 0.0
        for v, w in zip(vals, ws, strict=True):
            if v != 0 and np.sign(v) == sign:
                num += v
                den += abs(w)
        res[idx] = num / den if den else 0.0
    return res


def _np_dare_drop(ds, density, seed):
    g = torch.Generator().manual_seed(seed)  # same draw order as the implementation documents
    out = []
    for d in ds:
        r = torch.rand(d.shape, generator=g, dtype=torch.float64).numpy()
        o = np.zeros(d.shape)
        for idx in np.ndindex(d.shape):
            if r[idx] < density:
                o[idx] = d[idx] / density
        out.append(o)
    return out


def _tiny_deltas():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3)]


W = [0.5, 1.0, -0.25]


def test_magnitude_prune_matches_reference():
    ds = _tiny_deltas()
    ref = sum(w * _np_trim(d.numpy(), 0.4) for d, w in zip(ds, W, strict=True))
    assert np.allclose(magnitude_prune(ds, W, 0.4).numpy(), ref, rtol=0, atol=1e-12)  # tol 1e-12 abs


def test_ties_matches_reference():
    ds = _tiny_deltas()
    ref = _np_ties_merge([_np_trim(d.numpy(), 0.5) for d in ds], W)
    assert np.allclose(ties(ds, W, 0.5).numpy(), ref, rtol=0, atol=1e-12)  # tol 1e-12 abs
    # density 1, equal weights, all agreeing signs → plain mean
    pos = [d.abs() for d in ds]
    assert torch.allclose(ties(pos, None, 1.0), sum(pos) / 3, atol=1e-12)  # tol 1e-12


def test_dare_linear_matches_reference():
    ds = _tiny_deltas()
    ref = sum(w * d for d, w in zip(_np_dare_drop([d.numpy() for d in ds], 0.3, 11), W, strict=True))
    got = dare_linear(ds, W, 0.3, torch.Generator().manual_seed(11))
    assert np.allclose(got.numpy(), ref, rtol=0, atol=1e-12)  # tol 1e-12 abs
    again = dare_linear(ds, W, 0.3, torch.Generator().manual_seed(11))
    assert torch.equal(got, again)  # deterministic with a fixed generator (exact)


def test_dare_ties_matches_reference():
    ds = _tiny_deltas()
    ref = _np_ties_merge(_np_dare_drop([d.numpy() for d in ds], 0.6, 5), W)
    got = dare_ties(ds, W, 0.6, torch.Generator().manual_seed(5))
    assert np.allclose(got.numpy(), ref, rtol=0, atol=1e-12)  # tol 1e-12 abs


# ------------------------------------------------------------------------------------------ merge_layer


def test_merge_layer_all_methods():
    assert MERGE_METHODS.names() == ["linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
    f = _experts(out=12, inn=10)
    for m in MERGE_METHODS:
        a, b, alpha, err = merge_layer(f, None, m, None, 0.5, torch.Generator().manual_seed(0))
        assert err <= 1e-10, m  # tol 1e-10: full rank stores the method's result exactly
        assert a.shape[1] == 10 and b.shape[0] == 12 and alpha == float(a.shape[0])
    a, b, alpha, err = merge_layer(f, None, "svd", 3)
    assert a.shape == (3, 10) and 0 < err < 1
    # ties at rank 2: compression error equals the tail of the dense ties result's singular values
    ds = [(al / x.shape[0]) * y @ x for x, y, al in f]
    dense = ties(ds, None, 0.5)
    s = torch.linalg.svdvals(dense)
    _, _, _, err = merge_layer(f, None, "ties", 2, 0.5)
    assert abs(err - float((s[2:] ** 2).sum().sqrt() / s.norm())) <= 1e-9  # tol 1e-9 abs


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda f: linear_merge([]), "factors"),
        (lambda f: linear_merge(f, [1.0]), "weights"),
        (lambda f: linear_merge([(f[0][0], f[1][1], 1.0)]), "factors[0].B"),
        (lambda f: linear_merge([f[0], (f[1][0][:, :3], f[1][1], 1.0)]), "factors[1]"),
        (lambda f: linear_merge([(f[0][0], f[0][1], float("nan"))]), "factors[0].alpha"),
        (lambda f: svd_merge(f, None, 0), "rank"),
        (lambda f: svd_merge(f, None, 2, method="qr"), "method"),
        (lambda f: auto_rank(f, None, 1.5), "budget"),
        (lambda f: ties([f[0][1] @ f[0][0]], None, 0.0), "density"),
        (lambda f: ties([torch.zeros(2, 2), torch.zeros(3, 2)]), "deltas[1]"),
        (lambda f: merge_layer(f, None, "average"), "method"),
        (lambda f: relative_error(f[0][0], f[0][1], 1.0, torch.zeros(3, 3)), "target"),
    ],
)
def test_validation_names_field(call, field):
    f = _experts()
    with pytest.raises(SelmaError) as e:
        call(f)
    assert str(e.value).startswith(f"{field}: got ")
    assert "allowed:" in str(e.value)
