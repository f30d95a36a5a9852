"""From pixels to objects: colour classification, connected components and shape features.

Every shape pixel of a world image is ``bg + t * (colour - bg)`` for one palette colour, with ``t``
its coverage (1 inside, a fraction on anti-aliased edges). :func:`classify_pixels` projects each
pixel onto the segment from the (estimated) background to each palette colour, takes the nearest
segment, and calls the pixel that colour when ``t >= 0.5`` and the distance is within ``tol``: the
binary masks are the shapes rasterised at half coverage, and ``t`` summed over a blob and its rim is
the shape's exact area in pixels. Generated images are handled the same way; ``tol`` decides how far
from a palette colour a pixel may stray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .spec import BACKGROUNDS, COLOURS

COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # (C, 3)


def as_array(image: Any) -> np.ndarray:
    """A PIL image or (H, W, 3) uint8 array as a float32 (H, W, 3) array in 0..255."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return arr.astype(np.float32)


def estimate_background(img: np.ndarray) -> tuple[np.ndarray, str]:
    """(background RGB, nearest background name): the median of the one-pixel frame (objects never touch it)."""
    frame = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(frame, axis=0)
    names = list(BACKGROUNDS)
    dist = [float(np.linalg.norm(bg - np.array(BACKGROUNDS[n], dtype=np.float32))) for n in names]
    return bg, names[int(np.argmin(dist))]


def classify_pixels(img: np.ndarray, bg: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels (H, W) int: colour index or -1, coverage t (C, H, W), residual (C, H, W)) of every pixel."""
    v = _PALETTE - bg  # (C, 3)
    d = img - bg  # (H, W, 3)
    t = np.clip(np.einsum("hwk,ck->chw", d, v) / np.maximum((v * v).sum(1), 1e-6)[:, None, None], 0.0, 1.0)
    resid = np.linalg.norm(d[None] - t[..., None] * v[:, None, None, :], axis=-1)  # (C, H, W)
    best = resid.argmin(0)
    t_best = np.take_along_axis(t, best[None], 0)[0]
    r_best = np.take_along_axis(resid, best[None], 0)[0]
    labels = np.where((t_best >= 0.5) & (r_best <= tol), best, -1)
    return labels, t, resid


def components(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """4-connected blobs of equal label (>= 0) as (label, flat pixel indices), in raster order of their first pixel.

    Label propagation with pointer jumping: each pixel points at the smallest index reachable so far.
    """
    h, w = labels.shape
    flat = labels.ravel()
    idx = np.arange(flat.size)
    parent = np.where(flat >= 0, idx, -1)
    pairs = []
    right = (flat[:-1] == flat[1:]) & (flat[:-1] >= 0) & ((idx[:-1] % w) != w - 1)
    pairs.append((idx[:-1][right], idx[1:][right]))
    down = (flat[:-w] == flat[w:]) & (flat[:-w] >= 0)
    pairs.append((idx[:-w][down], idx[w:][down]))
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    while True:
        pa, pb = parent[a], parent[b]
        low = np.minimum(pa, pb)
        new = parent.copy()
        np.minimum.at(new, pa, low)
        np.minimum.at(new, pb, low)
        new[new >= 0] = new[new[new >= 0]]  # pointer jumping
        new[new >= 0] = new[new[new >= 0]]
        if np.array_equal(new, parent):
            break
        parent = new
    roots = parent[parent >= 0]
    out = []
    for root in np.unique(roots):
        members = np.flatnonzero(parent == root)
        out.append((int(flat[root]), members))
    return out


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (Andrew's monotone chain, then the shoelace formula)."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    lower: list[np.ndarray] = []
    upper: list[np.ndarray] = []
    for p in pts:
        while len(lower) >= 2 and _cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in pts[::-1]:
        while len(upper) >= 2 and _cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1])
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


@dataclass(frozen=True)
class Blob:
    """One connected blob of one colour; lengths in pixels, positions in fractions of the image side."""

    colour: str
    area: int  # pixels at half coverage or more
    coverage: float  # summed coverage over the blob and its rim: the shape's area in pixels
    width: int
    height: int
    fill: float  # area / (width * height)
    solidity: float  # area / convex hull area (pixel corners)
    asymmetry: float  # (centroid y - box centre y) / height; > 0: heavier at the bottom
    x: float  # box centre of the half-coverage pixels
    y: float
    cx: float  # coverage-weighted centroid, pixels
    cy: float
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixel window around the blob, 2 px margin


def blob_features(colour: int, members: np.ndarray, shape: tuple[int, int], t: np.ndarray, resid: np.ndarray,
                  tol: float) -> Blob:
    h, w = shape
    ys, xs = np.divmod(members, w)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    weights = soft_mask(colour, members, shape, t, resid, tol)
    coverage = float(weights.sum())
    gy, gx = np.indices(shape)
    cx = float((weights * (gx + 0.5)).sum() / coverage)  # soft centroid, pixel units
    cy = float((weights * (gy + 0.5)).sum() / coverage)
    n = len(members)
    return Blob(colour=COLOUR_NAMES[colour], area=n, coverage=coverage, width=bw, height=bh, fill=n / (bw * bh),
                solidity=n / max(hull_area(corners), 1.0), asymmetry=float((ys.mean() - (y0 + y1) / 2) / bh),
                x=(x0 + x1 + 1) / 2 / w, y=(y0 + y1 + 1) / 2 / h, cx=cx, cy=cy,
                box=(max(x0 - 2, 0), max(y0 - 2, 0), min(x1 + 3, w), min(y1 + 3, h)))


def soft_mask(colour: int, members: np.ndarray, shape: tuple[int, int], t: np.ndarray, resid: np.ndarray,
              tol: float) -> np.ndarray:
    """(H, W) coverage of one blob: ``t`` on its pixels and on the rim around them (8-neighbours) that
    lies on the same colour's segment, 0 elsewhere. Its sum is the shape's area in pixels."""
    core = np.zeros(shape, dtype=bool)
    core.flat[members] = True
    grown = core.copy()
    grown[1:] |= core[:-1]
    grown[:-1] |= core[1:]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    rim = grown & ~core & (resid[colour] <= tol)
    return np.where(core | rim, t[colour], 0.0)
