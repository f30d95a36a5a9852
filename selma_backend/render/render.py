"""Stage 2: render prompts into a SELMA dataset with true multi-prompt batches.

prepare (validate, plan, check dataset.json, clean up, reconcile) -> render (batches, OOM halving,
stop) -> finish (reconcile the other ranks' images, sort the index). The on-disk format and the
crash-safety invariants are in :mod:`.dataset`; the split across processes in :mod:`.shard`.

Reproducibility: image (prompt id, sample) starts from noise drawn by its own CPU
``torch.Generator`` seeded with :func:`derive_seed` (run seed, prompt id, sample); stochastic samplers
draw their per-step noise from the same generator. Which batch an image lands in therefore does not
change its noise. Kernels may still round differently for different batch sizes: on CPU (tiny SD1,
fp32) we observe at most 1 level of 255 on <= 0.03% of values; on GPUs in fp16/bf16 expect more.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import SelmaError, invalid
from ..fsio import read_jsonl
from ..models.base import LoadedPipeline
from . import dataset as ds
from .config import NOT_IMAGE_SETTINGS, RenderConfig
from .schedulers import build_scheduler
from .shard import Shard

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
ShouldStop = Callable[[], bool]
OnImage = Callable[[Path, dict[str, Any]], None]
Warn = Callable[[str], None]


@dataclass(frozen=True)
class Item:
    """One image to exist: (prompt, sample), its file name and its seed."""

    prompt: dict[str, Any]
    sample: int
    file_name: str
    seed: int


@dataclass
class RenderReport:
    out_dir: str
    planned: int  # (prompt, sample) pairs asked for
    existing: int = 0  # of those, already rendered before this run (all ranks)
    rendered: int = 0  # images this process rendered in this run
    present: int = 0  # of the planned images, how many exist at the end (all ranks; rank 0 only)
    rows_from_pngs: int = 0  # rows added to metadata.jsonl from committed PNGs (crash repair, other ranks)
    removed_debris: list[str] = field(default_factory=list)
    status: str = "running"  # complete | stopped
    batch_size: int = 0  # the batch size in use at the end (smaller than asked after out-of-memory)
    warnings: list[str] = field(default_factory=list)
    rank: int = 0
    world: int = 1
    elapsed_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.rendered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 4)}


class _StopRequested(Exception):
    """Raised from the step callback to abandon the current batch (nothing of it is committed)."""


# --- prepare ------------------------------------------------------------------------------------------


def derive_seed(run_seed: int, prompt_id: str, sample: int) -> int:
    """The seed of image (prompt id, sample) in a run: stable across processes, platforms and versions.

    53 bits, so every JSON reader (JavaScript included) keeps it exact.
    """
    digest = hashlib.sha256(f"selma-render\0{run_seed}\0{prompt_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 11


def load_prompts(prompts: Sequence[dict[str, Any]] | str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Prompt rows from a list or a prompts.jsonl; each needs ``id``, ``prompt``, ``skill``; ids unique."""
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        if not path.is_file():
            raise invalid("prompts", str(path), "an existing prompts.jsonl", "make one with `selma prompts`")
        rows = read_jsonl(path)
    else:
        rows = list(prompts)
    if not rows:
        raise invalid("prompts", "no rows", "at least one prompt row {id, skill, prompt}")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        for key in ("id", "prompt", "skill"):
            value = row.get(key) if isinstance(row, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise invalid(f"prompts[{i}].{key}", value, "a non-empty string",
                              "each row needs id, skill and prompt (the prompts.jsonl format)")
        if row["id"] in seen:
            raise invalid(f"prompts[{i}].id", row["id"], "ids unique within the file")
        seen.add(row["id"])
    return rows


def plan(rows: list[dict[str, Any]], config: RenderConfig) -> list[Item]:
    items, by_lower = [], {}
    for row in rows:
        for k in range(config.images_per_prompt):
            name = ds.stem_for(row["id"], k) + ".png"
            other = by_lower.setdefault(name.lower(), row["id"])
            if other != row["id"]:
                raise invalid("prompts", f"ids {other!r} and {row['id']!r}", "ids that differ in more than case "
                              "or punctuation", f"both map to the file {name}")
            items.append(Item(row, k, name, derive_seed(config.seed, row["id"], k)))
    return items


def resolve_size(pipe: Any, config: RenderConfig) -> tuple[int, int]:
    default = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return config.width or default, config.height or default


def describe(lp: LoadedPipeline, config: RenderConfig, size: tuple[int, int], scheduler: Any,
             prompts_source: str) -> dict[str, Any]:
    """What dataset.json records; ``settings`` are the fields that change images."""
    settings = {k: v for k, v in config.to_dict().items() if k not in NOT_IMAGE_SETTINGS}
    settings.update(width=size[0], height=size[1], model_hash=lp.model_hash, arch=lp.arch,
                    prediction_type=lp.prediction_type)
    return {
        "settings": settings,
        "config": config.to_dict(),
        "model": {"hash": lp.model_hash, "source": lp.source, "arch": lp.arch,
                  "prediction_type": lp.prediction_type, "info": _jsonable(lp.info),
                  "dtype": str(getattr(lp.pipe.unet, "dtype", "")), "device": str(getattr(lp.pipe, "device", ""))},
        "scheduler": {"class": type(scheduler).__name__,
                      "config": _jsonable({k: v for k, v in scheduler.config.items() if not k.startswith("_use")})},
        "prompts": prompts_source,
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"selma": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj if obj is None or isinstance(obj, (str, int, float, bool)) else str(obj)


# --- render -------------------------------------------------------------------------------------------


def render_dataset(
    lp: LoadedPipeline,
    prompts: Sequence[dict[str, Any]] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: RenderConfig,
    *,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    on_image: OnImage | None = None,
    warn: Warn | None = None,
    allow_mixed: bool = False,
    shard: Shard | None = None,
) -> RenderReport:
    """Render every (prompt, sample) pair missing from ``out_dir``; resumable, stoppable, shardable.

    ``progress(done, total)`` counts this process's images of this run; ``should_stop()`` is checked
    before every batch and every denoising step (a stopped batch is dropped, finished images stay);
    ``on_image(png_path, row)`` follows each commit. Settings that differ from the images already in
    ``out_dir`` are refused unless ``allow_mixed``. The pipeline's scheduler is restored afterwards.
    """
    start = time.perf_counter()
    shard = shard or Shard()
    out = Path(out_dir)
    items = plan(load_prompts(prompts), config)
    pipe = lp.pipe
    if pipe is None:
        raise SelmaError("the model was released; load it again before rendering")
    size = resolve_size(pipe, config)
    report = RenderReport(str(out), len(items), batch_size=config.batch_size, rank=shard.rank, world=shard.world,
                          config=config.to_dict())
    say = _warner(report, warn)
    source = str(prompts) if isinstance(prompts, (str, os.PathLike)) else "(rows given in memory)"
    original = pipe.scheduler
    try:
        pipe.scheduler = build_scheduler(config.scheduler, original)
        description = describe(lp, config, size, pipe.scheduler, source)
        with ds.locked(out) if shard.is_main else contextlib.nullcontext():
            if shard.is_main:
                ds.record_render(out, description, allow_mixed)
                report.removed_debris = ds.cleanup(out)
                _, report.rows_from_pngs = ds.reconcile(out, say)
            shard.barrier()  # rank 0 has prepared the folder
            have = ds.committed_pngs(out)
            missing = [it for it in items if it.file_name not in have]
            report.existing = len(items) - len(missing)
            shard.barrier()  # every rank has scanned the same folder: now they may write
            _render_items(pipe, shard.take(missing), out, config, size, description["settings"], report,
                          shard.is_main, progress, should_stop, on_image, say)
            shard.barrier()
            if shard.is_main:
                _, added = ds.reconcile(out, say)
                report.rows_from_pngs += added
                have = ds.committed_pngs(out)
                report.present = sum(it.file_name in have for it in items)
                if report.present == report.planned:
                    ds.canonicalize(out)
    finally:
        pipe.scheduler = original
        free_memory()
    report.elapsed_s = time.perf_counter() - start
    return report


def _render_items(pipe: Any, todo: list[Item], out: Path, config: RenderConfig, size: tuple[int, int],
                  settings: dict[str, Any], report: RenderReport, writes_index: bool, progress: Progress | None,
                  should_stop: ShouldStop | None, on_image: OnImage | None, say: Warn) -> None:
    indexed = set(ds.read_index(out)) if writes_index else set()
    bs, done = config.batch_size, 0
    if progress:
        progress(0, len(todo))
    while done < len(todo):
        if should_stop and should_stop():
            report.status = "stopped"
            return
        batch = todo[done:done + bs]
        try:
            images = generate_images(pipe, [it.prompt["prompt"] for it in batch], [it.seed for it in batch],
                                     steps=config.steps, cfg=config.cfg, negative=config.negative, size=size,
                                     should_stop=should_stop, stop=_StopRequested)
        except _StopRequested:
            report.status = "stopped"
            return
        if images is None:  # out of memory: same items, half the batch (rounded up)
            free_memory()
            if len(batch) == 1:
                raise SelmaError(f"out of memory rendering one {size[0]}x{size[1]} image; lower width/height, "
                                 "load the model in fp16/bf16, or free the device (close other programs)")
            bs = (len(batch) + 1) // 2
            say(f"out of memory at batch size {len(batch)}; continuing with batch size {bs}")
            report.batch_size = bs
            continue
        for item, image in zip(batch, images, strict=True):
            row = ds.make_row(item.prompt["id"], item.sample, item.prompt["prompt"], item.prompt["skill"],
                              item.seed, "render")
            png = ds.commit_image(out, image, row, settings)
            if writes_index and item.file_name not in indexed:
                ds.append_rows(out, [row])
            done += 1
            report.rendered = done
            if on_image:
                on_image(png, row)
            if progress:
                progress(done, len(todo))
        del images
    report.status = "complete"


def generate_images(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, cfg: float,
                    negative: str, size: tuple[int, int], should_stop: ShouldStop | None,
                    stop: type[Exception]) -> list[Any] | None:
    """One pipeline call for ``prompts`` (one seed each), shared by rendering and evaluation.

    Returns the PIL images, or None when the device ran out of memory (the caller halves its batch).
    Raises ``stop`` when ``should_stop()`` turns true between denoising steps. ``negative``: empty for
    the model's own default.
    """
    import torch

    def check_stop(_pipe: Any, _step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if should_stop and should_stop():
            raise stop
        return kwargs

    try:
        return pipe(
            prompt=list(prompts), negative_prompt=[negative] * len(prompts) if negative else None,
            num_inference_steps=steps, guidance_scale=cfg, width=size[0], height=size[1],
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            callback_on_step_end=check_stop, output_type="pil",
        ).images
    except stop:
        raise
    except Exception as e:  # only out-of-memory is handled here; everything else propagates
        if is_out_of_memory(e):
            return None  # leaving the handler drops the traceback and the tensors it holds
        raise


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(e, oom_types) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def free_memory() -> None:
    """Collect garbage and return cached device memory (after an out-of-memory batch or a run)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def _warner(report: RenderReport, warn: Warn | None) -> Warn:
    def say(message: str) -> None:
        report.warnings.append(message)
        log.warning(message)
        if warn:
            warn(message)

    return say
