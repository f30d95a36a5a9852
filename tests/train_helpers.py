"""Datasets and configs for the training tests (stage 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from selma_backend.render.dataset import append_images
from selma_backend.train import TrainConfig

SPATIAL = ["a red cube to the left of a blue ball", "a green cone right of a yellow box",
           "a cat on the left and a dog on the right", "a lamp above a table", "the leftmost cup is red",
           "a tree to the right of a house"]


def make_dataset(folder: Path, skill: str = "spatial", prompts: list[str] | None = None,
                 sizes: list[tuple[int, int]] | None = None, seed: int = 0) -> Path:
    """A SELMA dataset of smooth random colour images (the native append path, no model needed)."""
    prompts = prompts or SPATIAL
    sizes = sizes or [(64, 64)] * len(prompts)
    rng = np.random.default_rng(seed)
    images = []
    for w, h in sizes:
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    append_images(folder, images, prompts, skill, seed=seed, source="test")
    return folder


def tiny_config(**kw) -> TrainConfig:
    """A few steps at 64 px on the tiny models: seconds on 2 CPU cores."""
    base = dict(rank=4, alpha=8.0, steps=4, batch_size=2, grad_accum=2, resolution=64, checkpoint_every=2,
                lr=1e-3, seed=0)
    base.update(kw)
    return TrainConfig(**base)
