"""Training data: which images of a dataset train an expert, their buckets, flips and batch order.

A dataset (stage 2/3 format) trains on the rows :func:`selma_backend.filter.review.effective_keep`
accepts (a person's review first, then the CLIP filter's ``keep``). Every image is resized to cover
its bucket and centre-cropped, so its VAE latent is a pure function of (image bytes, bucket) and can
be cached (``cache.py``).

Batch order is a pure function of (seed, epoch): resuming at (epoch, batch index) replays exactly
the batches an uninterrupted run would have seen, and every process of a data-parallel run computes
the same global batches and takes its own slice.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SelmaError, invalid
from ..filter.review import effective_keep
from ..fsio import read_jsonl, sha256_file
from ..render.dataset import METADATA
from ..skills import FLIP_POLICIES, all_skills

# --- captions under a horizontal flip ----------------------------------------------------------------

_MIRROR = {"left": "right", "leftmost": "rightmost", "lefthand": "righthand", "leftward": "rightward",
           "leftwards": "rightwards"}
_MIRROR.update({v: k for k, v in list(_MIRROR.items())})
_MIRROR_RE = re.compile(r"\b(" + "|".join(sorted(_MIRROR, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def mirror_caption(text: str) -> str:
    """The caption of the horizontally flipped image: left and right words swapped, case kept.

    ``"a cat to the left of a dog"`` -> ``"a cat to the right of a dog"``; ``"Right-hand"`` -> ``"Left-hand"``.
    """
    def swap(m: re.Match[str]) -> str:
        word = m.group(0)
        new = _MIRROR[word.lower()]
        if word.isupper() and len(word) > 1:
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return _MIRROR_RE.sub(swap, text)


def flip_caption(text: str, policy: str) -> str | None:
    """The caption to train a flipped image with under ``policy``, or None when it must not be flipped."""
    if policy == "never":
        return None
    if policy == "allow":
        return text
    if policy == "swap_left_right":
        return mirror_caption(text)
    raise invalid("flip policy", policy, FLIP_POLICIES)


# --- samples -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One training image. ``size`` is the bucket (width, height) it is cropped to."""

    image: Path
    image_sha256: str
    caption: str
    skill: str
    flip: str  # the flip policy that applies to it
    score: float | None  # its CLIP score from stage 3, if any
    size: tuple[int, int]

    def caption_for(self, flipped: bool) -> str:
        if not flipped:
            return self.caption
        text = flip_caption(self.caption, self.flip)
        if text is None:
            raise SelmaError(f"{self.image}: flipped although its flip policy is 'never' (a bug; please report it)")
        return text


def load_samples(dataset_dir: str | os.PathLike[str], *, resolution: int, buckets: bool, flip: str = "skill",
                 user_dir: str | os.PathLike[str] | None = None) -> list[Sample]:
    """The kept rows of one dataset as samples, in file order. ``flip``: ``skill`` (each row's skill
    policy; unknown skills count as ``allow``) or a policy forced for all rows."""
    root = Path(dataset_dir)
    rows = read_jsonl(root / METADATA) if (root / METADATA).is_file() else []
    if not rows:
        raise SelmaError(f"{root}: no {METADATA} rows; render a dataset into it first (selma render / SELMA Render Dataset)")
    skills = all_skills(user_dir) if flip == "skill" else {}
    samples = []
    for row in rows:
        if not effective_keep(row):
            continue
        samples.append(_sample(root, row, resolution, buckets, flip, skills))
    if not samples:
        raise SelmaError(f"{root}: all {len(rows)} images are rejected (keep=false or review=reject); "
                         "lower the filter threshold or review the dataset")
    return samples


def _sample(root: Path, row: dict, resolution: int, buckets: bool, flip: str, skills: dict) -> Sample:
    name = row.get("file_name")
    text = row.get("text")
    if not isinstance(name, str) or not isinstance(text, str) or not text.strip():
        raise invalid(f"{root / METADATA} row", {"file_name": name, "text": text}, "a file_name and a non-empty text")
    path = (root / name).resolve()
    if root.resolve() not in path.parents or not path.is_file():
        raise invalid(f"{root / METADATA} file_name", name, "an image file inside the dataset folder")
    skill = str(row.get("skill") or "")
    policy = flip if flip != "skill" else (skills[skill].flip if skill in skills else "allow")
    score = row.get("clip_score")
    size = bucket_for(_image_size(path), resolution) if buckets else (resolution, resolution)
    return Sample(path, sha256_file(path), text, skill, policy, float(score) if score is not None else None, size)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise SelmaError(f"{path}: not a readable image ({e}); remove it from metadata.jsonl or re-render") from e


# --- buckets -----------------------------------------------------------------------------------------

def bucket_sizes(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) multiples of ``step``: for each side length from resolution/2 up, the largest
    other side with area <= resolution**2 and aspect <= ``max_ratio``; both orientations, square included."""
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    side = max(step, resolution // 2 // step * step)
    while side <= resolution:
        other = min(area // side // step * step, int(side * max_ratio) // step * step)
        if other >= side:
            sizes |= {(side, other), (other, side)}
        side += step
    return sorted(sizes)


def bucket_for(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``size`` (in log space; ties: the larger area)."""
    ratio = math.log(size[0] / size[1])
    return min(bucket_sizes(resolution), key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def load_pixels(sample: Sample, flipped: bool) -> torch.Tensor:
    """The image resized to cover its bucket, centre-cropped, optionally mirrored: (3, H, W) in [-1, 1]."""
    import numpy as np
    from PIL import Image

    w, h = sample.size
    with Image.open(sample.image) as im:
        im = im.convert("RGB")
        scale = max(w / im.width, h / im.height)
        rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        im = im.resize((rw, rh), Image.BICUBIC)
        left, top = (rw - w) // 2, (rh - h) // 2
        im = im.crop((left, top, left + w, top + h))
        if flipped:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# --- batch order -------------------------------------------------------------------------------------

View = tuple[int, bool]  # (sample index, flipped)


def epoch_batches(samples: Sequence[Sample], batch_size: int, seed: int, epoch: int) -> list[list[View]]:
    """The global batches of one epoch: every sample once (a bucket's last batch is filled by wrapping
    around its shuffled list), batches never mix buckets, flips drawn per sample where its policy
    allows. A pure function of (samples, batch_size, seed, epoch)."""
    g = torch.Generator().manual_seed(_mix(seed, epoch))
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        by_bucket.setdefault(s.size, []).append(i)
    batches: list[list[int]] = []
    for size in sorted(by_bucket):
        idx = by_bucket[size]
        order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        n = math.ceil(len(order) / batch_size) * batch_size
        filled = [order[j % len(order)] for j in range(n)]
        batches += [filled[j:j + batch_size] for j in range(0, n, batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    flips = torch.rand(sum(len(b) for b in batches), generator=g).tolist()
    out, k = [], 0
    for b in order:
        views = []
        for i in batches[b]:
            views.append((i, samples[i].flip != "never" and flips[k] < 0.5))
            k += 1
        out.append(views)
    return out


def _mix(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 12345) % (2**63 - 1)


def loss_weights(samples: Sequence[Sample], mode: str) -> list[float]:
    """Per-sample loss weights: ``none`` -> all 1; ``clip`` -> CLIP score / mean score (mean 1), an
    error if any kept sample has no score (run the filter first)."""
    if mode == "none":
        return [1.0] * len(samples)
    if mode != "clip":
        raise invalid("score_weighting", mode, ["none", "clip"])
    missing = [s.image.name for s in samples if s.score is None]
    if missing:
        raise SelmaError(f"score_weighting='clip' needs a clip_score for every kept image; {len(missing)} have none "
                         f"(e.g. {missing[0]}). Run the filter (selma filter / SELMA Filter Dataset) first")
    scores = [max(float(s.score), 1e-6) for s in samples]  # type: ignore[arg-type]
    mean = sum(scores) / len(scores)
    return [x / mean for x in scores]
