"""Shared by tests/test_render_*.py: the tiny SD1 pipeline, prompt rows and dataset checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from selma_backend.fsio import read_jsonl
from selma_backend.models.base import LoadedPipeline

#: PNG pixels of one (prompt, sample) rendered in different batch compositions on CPU may differ by
#: matmul rounding: at most this many levels (of 255) ...
PIXEL_TOL = 2
#: ... on at most this share of values (observed: 1 level on < 0.01%).
PIXEL_SHARE = 0.01


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: on a shared 2-core machine two spinning OpenMP threads are up to 8x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_tiny(path: str | Path) -> LoadedPipeline:
    """A tiny diffusers folder through the real loader (fp32, CPU), without per-call progress bars."""
    from selma_backend.models.config import ModelConfig
    from selma_backend.models.loader import load_pipeline

    lp = load_pipeline(ModelConfig(path=str(path), dtype="fp32", device="cpu"))
    lp.pipe.set_progress_bar_config(disable=True)
    return lp


def prompt_rows(n: int, skill: str = "countbench") -> list[dict[str, Any]]:
    words = ["apples", "cats", "chairs", "boats", "kites", "cups"]
    return [{"id": f"{skill}-{i:06d}", "skill": skill, "prompt": f"{i + 1} {words[i % len(words)]} on a table",
             "source": "offline", "seed": 0} for i in range(n)]


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def assert_images_close(a: Path, b: Path) -> None:
    x, y = pixels(a), pixels(b)
    diff = np.abs(x - y)
    assert diff.max() <= PIXEL_TOL, (a.name, int(diff.max()))
    assert (diff > 0).mean() <= PIXEL_SHARE, (a.name, float((diff > 0).mean()))


def check_dataset(out: Path, expected_names: set[str]) -> list[dict[str, Any]]:
    """The dataset invariants: each image once in metadata.jsonl, decodable, captioned; no debris."""
    from PIL import Image

    rows = read_jsonl(out / "metadata.jsonl")
    names = [r["file_name"] for r in rows]
    assert len(names) == len(set(names)), "a row is duplicated"
    assert set(names) == expected_names
    on_disk = {p.name for p in out.iterdir()}
    assert {n for n in on_disk if n.endswith(".png")} == expected_names
    assert {n for n in on_disk if n.endswith(".txt")} == {n[:-4] + ".txt" for n in expected_names}
    assert not [n for n in on_disk if n.endswith(".tmp")], "temp files left"
    for r in rows:
        with Image.open(out / r["file_name"]) as im:
            im.load()  # decodes every pixel: a torn PNG raises
        assert (out / r["file_name"]).with_suffix(".txt").read_text(encoding="utf-8") == r["text"]
    return rows
