"""Render every evaluation prompt with every model: identical seeds and settings, true multi-prompt batches.

Image (prompt id, sample) starts from the noise of ``selma_backend.render.derive_seed(seed, prompt id,
sample)`` for every model, so a difference between the base's and a LoRA's image is the LoRA's doing
(on CPU, fp32, batching changes at most 1 level of 255 on a few pixels; see ``render.render``). The
pipeline's scheduler is built from the same ``SCHEDULERS`` registry as stage 2 and restored afterwards.

Files: ``images/<model key>/<prompt stem>_s<sample>.png`` under the report folder, each with the
SELMA record (model, prompt, seed, settings) in a PNG text chunk, written atomically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SelmaError
from ..fsio import atomic_write_bytes
from ..render import dataset as ds
from ..render.render import derive_seed, free_memory, generate_images, resolve_size
from ..render.schedulers import build_scheduler
from .config import EvalConfig
from .models import ModelEntry, lora_applied

Tick = Callable[[int], None]
ShouldStop = Callable[[], bool]


class Stopped(Exception):
    """The user asked to stop (Cancel); nothing of the evaluation is published."""


@dataclass(frozen=True)
class EvalItem:
    """One image each model renders: (prompt, sample) and its seed."""

    prompt_id: str
    skill: str
    prompt: str
    sample: int
    seed: int

    @property
    def stem(self) -> str:
        return ds.stem_for(self.prompt_id, self.sample)


def plan_items(rows: Sequence[dict[str, Any]], config: EvalConfig) -> list[EvalItem]:
    """Every (prompt, sample) pair, prompt order kept; seeds from the render seed."""
    r = config.render
    return [EvalItem(row["id"], row["skill"], row["prompt"], k, derive_seed(r.seed, row["id"], k))
            for row in rows for k in range(r.images_per_prompt)]


def image_path(key: str, item: EvalItem) -> str:
    """The image's path relative to the report folder (what scores.json and index.html use)."""
    return f"images/{key}/{item.stem}.png"


def render_models(pipe: Any, models: Sequence[ModelEntry], items: Sequence[EvalItem], out_dir: Path, config: EvalConfig,
                  *, tick: Tick | None = None, should_stop: ShouldStop | None = None) -> dict[str, Any]:
    """Render ``items`` with each model into ``out_dir``; returns the settings recorded in scores.json.

    Raises :class:`Stopped` when ``should_stop()`` turns true (checked per batch and per step).
    """
    size = resolve_size(pipe, config.render)
    original = pipe.scheduler
    try:
        pipe.scheduler = build_scheduler(config.render.scheduler, original)
        settings = {**config.render.to_dict(), "width": size[0], "height": size[1],
                    "scheduler_class": type(pipe.scheduler).__name__, "lora_scale": config.lora_scale}
        for model in models:
            with lora_applied(pipe, model, config.lora_scale):
                _render_one(pipe, model, items, out_dir, config, size, settings, tick, should_stop)
    finally:
        pipe.scheduler = original
    return settings


def _render_one(pipe: Any, model: ModelEntry, items: Sequence[EvalItem], out_dir: Path, config: EvalConfig,
                size: tuple[int, int], settings: dict[str, Any], tick: Tick | None, should_stop: ShouldStop | None) -> None:
    bs, done = config.render.batch_size, 0
    while done < len(items):
        if should_stop and should_stop():
            raise Stopped
        batch = items[done:done + bs]
        r = config.render
        images = generate_images(pipe, [it.prompt for it in batch], [it.seed for it in batch], steps=r.steps, cfg=r.cfg,
                                 negative=r.negative, size=size, should_stop=should_stop, stop=Stopped)
        if images is None:  # out of memory: the same items, half the batch
            free_memory()
            if len(batch) == 1:
                raise SelmaError(f"out of memory rendering one {size[0]}x{size[1]} image; lower width/height or load "
                                 "the model in fp16/bf16")
            bs = (len(batch) + 1) // 2
            continue
        for item, image in zip(batch, images, strict=True):
            record = {"model": model.key, "lora": model.path, "prompt_id": item.prompt_id, "prompt": item.prompt,
                      "skill": item.skill, "sample": item.sample, "seed": item.seed, "settings": settings}
            atomic_write_bytes(out_dir / image_path(model.key, item), ds.encode_png(image, record), overwrite=False)
        done += len(batch)
        if tick:
            tick(len(batch))

