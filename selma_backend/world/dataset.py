"""Ground-truth training data: world prompts rendered into a SELMA dataset folder.

The folder is exactly what stage 2 writes (:mod:`selma_backend.render.dataset`: PNGs with their
"selma" record, one ``<stem>.txt`` caption each, ``metadata.jsonl``, ``dataset.json``; same commit
protocol, lock and resume), so stage 3's filter and stage 4's loaders read it unchanged. Instead of a
diffusion model, each (prompt, sample) gets a scene drawn for the prompt's spec with a seed derived
from (run seed, prompt id, sample), rendered exactly; the scene (the ground truth) is kept in the
PNG's record under ``settings.scene``. Re-running renders only what is missing; the same settings
give byte-identical images.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import SelmaError, check_int, invalid
from ..render import dataset as ds
from .captions import parse_caption
from .scene import Scene, render_scene, sample_scene
from .spec import PromptSpec

RENDERER = "selma-world"
WORLD_VERSION = 1  # bump when drawing changes: images of different versions differ


@dataclass(frozen=True)
class WorldRenderConfig:
    resolution: int = 64
    supersample: int = 4
    images_per_prompt: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name, lo, hi in (("resolution", 16, 512), ("supersample", 1, 8), ("images_per_prompt", 1, 1000),
                             ("seed", 0, 2**63 - 1)):
            check_int(name, getattr(self, name), lo, hi)

    def settings(self) -> dict[str, Any]:
        """What changes the images (dataset.json refuses to mix other settings into one folder)."""
        return {"renderer": RENDERER, "world_version": WORLD_VERSION, "resolution": self.resolution,
                "supersample": self.supersample, "seed": self.seed}


@dataclass
class WorldRenderReport:
    out_dir: str
    planned: int
    existing: int = 0
    rendered: int = 0
    elapsed_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.rendered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


def scene_seed(run_seed: int, prompt_id: str, sample: int) -> int:
    digest = hashlib.sha256(f"selma-world-scene:{run_seed}:{prompt_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def spec_of(row: dict[str, Any]) -> PromptSpec:
    """A prompt row's spec: its ``spec`` field when present, else its caption parsed."""
    return PromptSpec.from_dict(row["spec"]) if isinstance(row.get("spec"), dict) else parse_caption(row["prompt"])


#: Rounds of ``sample_scene`` (50 tries each) before a scene counts as impossible. A tight relation
#: between two large objects misses all 50 tries about once in 3,000 spatial prompts.
SCENE_ROUNDS = 20


def _scene(spec: PromptSpec, seed: int) -> Scene:
    """The scene of ``(spec, seed)``: the first round's scene whenever it has one (so datasets made before
    stay byte-identical); otherwise the same generator keeps drawing, up to :data:`SCENE_ROUNDS` rounds."""
    rng = random.Random(seed)
    for round_ in range(SCENE_ROUNDS):
        try:
            return sample_scene(spec, rng)
        except SelmaError:
            if round_ == SCENE_ROUNDS - 1:
                raise
    raise AssertionError("unreachable")


def render_world_dataset(prompts: Sequence[dict[str, Any]] | str | os.PathLike[str], out_dir: str | os.PathLike[str],
                         config: WorldRenderConfig | None = None, *, allow_mixed: bool = False,
                         progress: Callable[[int, int], None] | None = None) -> WorldRenderReport:
    """Render every missing (prompt, sample) of ``prompts`` (rows or a prompts.jsonl) into ``out_dir``."""
    from ..render.render import load_prompts

    config = config or WorldRenderConfig()
    start = time.perf_counter()
    rows = load_prompts(prompts)
    specs = {r["id"]: spec_of(r) for r in rows}  # every caption checked before anything is written
    out = Path(out_dir)
    items = [(r, k) for r in rows for k in range(config.images_per_prompt)]
    report = WorldRenderReport(str(out), len(items))
    settings = config.settings()
    description = {"settings": settings, "config": asdict(config), "versions": {"selma": __version__},
                   "prompts": str(prompts) if isinstance(prompts, (str, os.PathLike)) else "(rows given in memory)"}
    with ds.locked(out):
        ds.record_render(out, description, allow_mixed)
        ds.cleanup(out)
        index, _ = ds.reconcile(out)
        have = ds.committed_pngs(out)
        todo = [(r, k) for r, k in items if ds.stem_for(r["id"], k) + ".png" not in have]
        report.existing = len(items) - len(todo)
        for done, (r, k) in enumerate(todo, 1):
            seed = scene_seed(config.seed, r["id"], k)
            scene = _scene(specs[r["id"]], seed)
            image = render_scene(scene, config.resolution, config.supersample)
            row = ds.make_row(r["id"], k, r["prompt"], r["skill"], seed, RENDERER)
            ds.commit_image(out, image, row, {**settings, "scene": scene.to_dict()})
            if row["file_name"] not in index:
                ds.append_rows(out, [row])
            report.rendered = done
            if progress:
                progress(done, len(todo))
        ds.reconcile(out)
        ds.canonicalize(out)
    report.elapsed_s = time.perf_counter() - start
    return report


def judge_dataset(dataset_dir: str | os.PathLike[str], config: Any = None) -> dict[str, Any]:
    """Judge every image of a dataset folder by its caption: mean score, per category, per skill."""
    from PIL import Image

    from .judge import judge

    root = Path(dataset_dir)
    rows = list(ds.read_index(root).values())
    if not rows:
        raise invalid("dataset", str(root), f"a folder with {ds.METADATA} rows")
    scores: dict[str, list[float]] = {}
    categories: dict[str, list[float]] = {}
    for row in rows:
        with Image.open(root / row["file_name"]) as im:
            result = judge(im.convert("RGB"), row["text"], config)
        scores.setdefault(str(row.get("skill")), []).append(result.score)
        for cat, value in result.categories.items():
            categories.setdefault(cat, []).append(value)
    everything = [s for v in scores.values() for s in v]
    return {"images": len(everything), "score": sum(everything) / len(everything),
            "skills": {k: sum(v) / len(v) for k, v in scores.items()},
            "categories": {k: sum(v) / len(v) for k, v in categories.items()}}
